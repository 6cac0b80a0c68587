"""FSDP2 through accelerate's plugin on Ray Train (CPU, gloo, 2 workers): it trains, its checkpoint resumes,
samples are written, and it ends where DDP ends for the same seed and data.

Why a tolerance and not bitwise (as in test_resume): DDP all-reduces gradient buckets, FSDP2 reduce-scatters
per block, and fp32 sums in another order differ in the last bits (~1e-7 relative). Adam turns a gradient into
an update of about lr in size whatever its magnitude, so the rounding noise reaches the weights only as a
relative error of the update, far below lr; `ATOL` (a tenth of one step's lr) is then a bar that any real
sharding bug (a lost shard, a gradient not averaged, a wrong optimiser state after resume: each an error of
order lr or larger) would fail. (Observed on 2 CPU workers: 0.0, since a sum of two values does not depend on
its order; clipping and more ranks can make it non-zero.) The stage also samples at its end, which under FSDP
goes through the gathered EMA on rank 0.
"""
from __future__ import annotations

import json

import pytest
import torch
from test_resume import final_weights, write_dataset

from latentforge.training.config import PlanConfig
from latentforge.training.trainer import fit_stage

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # ~3.5 min on the loaded 2-core machine

LR = 3e-3
ATOL = LR / 10


def plan(fsdp: bool, **stage) -> PlanConfig:
    return PlanConfig.model_validate({
        "model": {"preset": "DiT-T", "overrides": {"hidden": 64, "depth": 2}}, "num_workers": 2, "max_failures": 1,
        "stages": [{"name": "s", "modalities": ["image", "video"], "steps": 6, "batch_size": 4,
                    "checkpoint_every": 3, "log_every": 3, "num_samples": 1, "sample_steps": 2,
                    "optim": {"lr": LR, "warmup_steps": 0}, "fsdp": {"enabled": fsdp}, **stage}]})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("tiny")
    write_dataset(root)
    return root


@pytest.fixture(scope="module")
def ddp(dataset, tmp_path_factory):
    p = plan(fsdp=False)
    return fit_stage(p, p.stages[0], [dataset], tmp_path_factory.mktemp("ddp"), "ddp")


@pytest.mark.parametrize("compile_blocks", [False, pytest.param(True, marks=pytest.mark.heavy)],
                         ids=["eager", "compiled-blocks"])  # compiled: +2.5 min of inductor C++ builds per worker
def test_fsdp2_resumes_and_matches_ddp(dataset, ddp, tmp_path, compile_blocks):
    """DDP eager is the reference either way: `compile: true` (each block compiled, then sharded) must train the
    same weights, through the fault and the resume."""
    p = plan(fsdp=True, fail_at_step=5, compile=compile_blocks)  # dies after the step-3 checkpoint; then resumes
    sharded = fit_stage(p, p.stages[0], [dataset], tmp_path, "fsdp")
    assert (tmp_path / "fsdp" / "scratch" / "fault-injected-s-5").exists()
    assert json.loads((sharded.checkpoint_dir / "state.json").read_text())["step"] == 6
    assert all(torch.isfinite(torch.tensor(r.metrics["loss"])) for r in (ddp, sharded))
    blob = torch.load(sharded.checkpoint_dir / "optimizer.pt", weights_only=True)
    assert blob["optimizer_format"] == "fqn" and "blocks.0.attn.q.weight" in blob["optimizer"]["state"]
    a, b = final_weights(ddp), final_weights(sharded)
    moved = 0.0
    for f in a:
        assert a[f].keys() == b[f].keys()
        for k in a[f]:
            assert torch.allclose(a[f][k], b[f][k], rtol=0, atol=ATOL), f"{f}:{k} {(a[f][k] - b[f][k]).abs().max()}"
            moved = max(moved, float((a[f][k] - b[f][k]).abs().max()))
    print("max |ddp - fsdp|", moved)


@pytest.mark.heavy  # parts: tests/training/test_inherit.py, test_fsdp_parts (optimizer state by name and back)
def test_an_fsdp_stage_inherits_the_moments_under_its_own_hyperparameters(dataset, ddp, tmp_path):
    """inherit: full from the DDP stage into a sharded one: AdamW's moments carry on (the step count goes on
    from the DDP stage's 6), while lr, betas and weight decay are this stage's (they were the saved ones)."""
    optim = {"lr": 1e-4, "warmup_steps": 10, "betas": [0.8, 0.95], "weight_decay": 0.05}
    p = plan(fsdp=True, inherit="full", steps=2, checkpoint_every=2, log_every=1, num_samples=0, optim=optim)
    result = fit_stage(p, p.stages[0], [dataset], tmp_path, "inherits", init_from=ddp.checkpoint_dir)
    saved = torch.load(result.checkpoint_dir / "optimizer.pt", weights_only=True)["optimizer"]
    (group,) = saved["param_groups"]
    assert (tuple(group["betas"]), group["weight_decay"], group["initial_lr"]) == ((0.8, 0.95), 0.05, 1e-4)
    assert group["lr"] == pytest.approx(1e-4 * 3 / 10)  # two steps into this stage's warm-up
    assert float(saved["state"]["blocks.0.attn.q.weight"]["step"]) == 6 + 2
