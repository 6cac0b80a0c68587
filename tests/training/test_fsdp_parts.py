"""The pieces FSDP adds that run without a process group: optimiser state by name <-> by index, the stage
option, and every latent family getting a gradient (so ranks reduce the same set)."""
from __future__ import annotations

import pytest
import torch

from latentforge.training import checkpoint as ckpt
from latentforge.training.config import TrainStageConfig
from latentforge.training.dit import DiT, DiTConfig
from latentforge.training.fsdp import build_fsdp_plugin

CFG = DiTConfig(hidden=32, depth=1, heads=2, visual_channels=4, audio_channels=8, text_dim=8, max_text_len=4)


def visual_loss(model: DiT) -> torch.Tensor:
    x = torch.randn(2, 4, 1, 4, 4)
    v = model(x, torch.rand(2), torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool), torch.zeros(2).long())
    return v.square().mean()


def test_optimizer_state_converts_by_name_and_back():
    torch.manual_seed(0)
    model = DiT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    visual_loss(model).backward()
    opt.step()
    native = opt.state_dict()
    by_name = ckpt.index_to_fqn(native, model)
    assert "visual.embed.weight" in by_name["state"] and "audio.embed.weight" not in by_name["state"]
    assert by_name["param_groups"][0]["params"][0] == next(iter(model.state_dict()))
    back = ckpt.fqn_to_index(by_name, model)
    assert back["param_groups"] == native["param_groups"] and back["state"].keys() == native["state"].keys()
    fresh = torch.optim.AdamW(DiT(CFG).parameters(), lr=1e-2)
    fresh.load_state_dict(back)
    for i, s in native["state"].items():
        assert torch.equal(fresh.state_dict()["state"][i]["exp_avg"], s["exp_avg"])


def test_fsdp_option_and_plugin():
    stage = TrainStageConfig.model_validate({"name": "s", "modalities": ["image"],
                                             "fsdp": {"enabled": True, "reshard_after_forward": False}})
    assert stage.fsdp.enabled and not stage.fsdp.cpu_offload
    with pytest.raises(ValueError, match="reshard"):
        TrainStageConfig.model_validate({"name": "s", "modalities": ["image"], "fsdp": {"reshard": True}})
    plugin = build_fsdp_plugin(stage.fsdp)
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is False
    assert plugin.transformer_cls_names_to_wrap == ["DiTBlock"]


def test_every_family_gets_a_gradient_when_asked():
    torch.manual_seed(0)
    model = DiT(CFG)
    visual_loss(model).backward()
    assert model.audio.embed.weight.grad is None
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.manual_seed(0)
    model2 = DiT(CFG)
    model2.grad_all_families = True
    visual_loss(model2).backward()
    assert all(p.grad is not None and not p.grad.any() for p in model2.audio.parameters())
    for n, g in plain.items():
        assert torch.equal(dict(model2.named_parameters())[n].grad, g), n
