"""What a stage takes from the previous one: the optimiser moments under the new stage's own hyperparameters
(inherit: full, across a REPA boundary too), an inherited EMA carried on rather than restarted, and samples
drawn on the time grid the stage trained with."""
from __future__ import annotations

import pytest
import torch

from latentforge.training import checkpoint as ckpt
from latentforge.training.config import TrainStageConfig
from latentforge.training.dit import DiT, DiTConfig
from latentforge.training.flow import sample
from latentforge.training.loader import Batch
from latentforge.training.loop import StageJob, build_optimizer, ema_warmup, update_ema
from latentforge.training.sampling import generate

MODEL = {"hidden": 32, "depth": 2, "heads": 2, "visual_channels": 4, "text_dim": 8, "max_text_len": 4,
         "mixer_depth": 1}
REPA = {**MODEL, "repa_depth": 1, "repa_dim": 6}


def stage(**kw) -> TrainStageConfig:
    return TrainStageConfig(name="s", modalities=["image"], **kw)


def trained_checkpoint(directory, model_cfg: dict, seed: int = 0):
    """A checkpoint after two AdamW steps (lr 1e-3, betas 0.9/0.99, no weight decay): moments in every
    parameter."""
    torch.manual_seed(seed)
    model = DiT(DiTConfig.from_dict(model_cfg))
    optimizer, scheduler = build_optimizer(model, stage(optim={"lr": 1e-3, "warmup_steps": 0}))
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        optimizer.step()
        scheduler.step()
    ckpt.save_checkpoint(directory, model, model, optimizer, scheduler, {"step": 2}, model_cfg)
    return model, optimizer


@pytest.mark.parametrize("before,after", [(MODEL, MODEL), (MODEL, REPA), (REPA, MODEL)],
                         ids=["same-model", "into-repa", "out-of-repa"])
def test_full_inheritance_takes_the_moments_and_keeps_this_stages_hyperparameters(tmp_path, before, after):
    old_model, old_opt = trained_checkpoint(tmp_path, before)
    model = DiT(DiTConfig.from_dict(after))
    optimizer, scheduler = build_optimizer(model, stage(optim={"lr": 1e-5, "warmup_steps": 100, "betas": (0.8, 0.95),
                                                               "weight_decay": 0.1}))
    ckpt.load_optimizer(tmp_path, optimizer, model)

    (group,) = optimizer.param_groups
    # this stage's warm-up from its first step (1/100 of its lr), betas and weight decay; not the saved ones
    assert group["lr"] == pytest.approx(1e-7) and group["initial_lr"] == 1e-5
    assert tuple(group["betas"]) == (0.8, 0.95) and group["weight_decay"] == 0.1
    old = dict(old_model.named_parameters())
    for name, p in model.named_parameters():
        if name.startswith("repa_projector."):
            assert p not in optimizer.state, name  # only this stage has it: fresh moments
            continue
        saved = old_opt.state[old[name]]
        assert torch.equal(optimizer.state[p]["exp_avg"], saved["exp_avg"]), name
        assert torch.equal(optimizer.state[p]["exp_avg_sq"], saved["exp_avg_sq"]), name
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()  # the loaded state fits this model
    scheduler.step()
    assert group["lr"] == pytest.approx(2e-7)


def test_an_inherited_ema_carries_on_and_a_new_one_warms_up(tmp_path):
    def job(inherit: str, init_from: str | None = str(tmp_path)) -> StageJob:
        return StageJob(stage=stage(inherit=inherit), model=MODEL, datasets=[], init_from=init_from)

    assert [ema_warmup(job(i)) for i in ("none", "weights", "weights+ema", "full")] == [True, True, False, False]
    assert ema_warmup(job("full", None))  # the first stage has nothing to carry on

    def after_steps(warmup: bool, steps: int = 10) -> float:
        ema, model = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.zeros_(ema.weight)  # the inherited average
        torch.nn.init.ones_(model.weight)  # this stage's weights
        for step in range(steps):
            update_ema(ema, model, 0.995, step, warmup)
        return float(ema.weight.detach())

    assert after_steps(False) == pytest.approx(1 - 0.995 ** 10)  # ~5% towards the new weights
    assert after_steps(True) > 0.99  # the warm-up all but replaces the average within 10 steps


def test_samples_use_the_timestep_shift_and_the_models_device():
    torch.manual_seed(0)
    model = DiT(DiTConfig.from_dict(MODEL)).eval()
    with torch.no_grad():
        for p in model.parameters():  # a new DiT's output layer is zero: its velocity would not depend on t
            p.normal_(0, 0.1)
    prompt = Batch(torch.zeros(1, 4, 1, 8, 8), torch.randn(1, 4, 8), torch.ones(1, 4, dtype=torch.bool),
                   torch.zeros(1, dtype=torch.long), ["a caption"])
    shifted = generate(model, prompt, steps=3, cfg_scale=1.0, seed=5, timestep_shift=3.0)
    expected = sample(model, (1, 4, 1, 8, 8), prompt.text, prompt.text_mask, prompt.modality, steps=3,
                      generator=torch.Generator().manual_seed(5), timestep_shift=3.0)
    assert torch.equal(shifted, expected)
    assert not torch.equal(shifted, generate(model, prompt, steps=3, cfg_scale=1.0, seed=5))
    # The prompt follows the model: on a meta-device model the noise is drawn on "meta" and nothing mixes
    # devices (a CUDA model with CPU prompts failed here the same way).
    meta = DiT(DiTConfig.from_dict(MODEL)).to("meta").eval()
    assert generate(meta, prompt, steps=1, cfg_scale=1.0, seed=0).device.type == "meta"
