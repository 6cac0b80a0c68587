from __future__ import annotations

import pytest
import torch

from latentforge.training.dit import DiT, DiT_models, DiTConfig, build_dit, count_params

CFG = DiTConfig(hidden=64, depth=2, heads=4, visual_channels=4, audio_channels=8, text_dim=32, max_text_len=8)


def make_model(perturb: bool = True) -> DiT:
    """A tiny DiT; perturbed so the zero-initialised gates and final layer no longer hide the inputs."""
    torch.manual_seed(0)
    model = DiT(CFG)
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model


def make_text(batch: int, length: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    text = torch.randn(batch, length, CFG.text_dim)
    mask = torch.arange(length)[None].expand(batch, -1) < torch.tensor([length, 3])[:batch, None]
    return text, mask


CASES = [
    ("image", 0, (2, 4, 1, 8, 8)),
    ("image-wide", 0, (2, 4, 1, 4, 12)),
    ("video", 1, (2, 4, 4, 8, 6)),
    ("audio", 2, (2, 8, 10, 1, 1)),
]


@pytest.mark.parametrize("name,modality,shape", CASES, ids=[c[0] for c in CASES])
def test_output_shape_matches_input(name: str, modality: int, shape: tuple[int, ...]) -> None:
    model = make_model()
    x = torch.randn(shape)
    out = model(x, torch.rand(2), *make_text(2), torch.full((2,), modality))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name,modality,shape", CASES, ids=[c[0] for c in CASES])
def test_initial_output_is_zero(name: str, modality: int, shape: tuple[int, ...]) -> None:
    model = make_model(perturb=False)
    out = model(torch.randn(shape), torch.rand(2), *make_text(2), torch.full((2,), modality))
    assert torch.count_nonzero(out) == 0


def test_gradients_reach_every_visual_param() -> None:
    model = make_model()
    out = model(torch.randn(2, 4, 2, 8, 8), torch.rand(2), *make_text(2), torch.tensor([1, 1]))
    out.square().mean().backward()
    unused = ("audio.", "null_text_embed")
    missing = [
        name
        for name, p in model.named_parameters()
        if not name.startswith(unused) and (p.grad is None or p.grad.abs().sum() == 0)
    ]
    assert missing == []


def test_masked_text_tokens_do_not_change_output() -> None:
    model = make_model()
    x, t, modality = torch.randn(2, 4, 1, 8, 8), torch.rand(2), torch.zeros(2, dtype=torch.long)
    text, mask = make_text(2)
    changed = torch.where(mask[..., None], text, torch.randn_like(text) * 10)
    assert not torch.equal(changed, text)
    torch.testing.assert_close(model(x, t, changed, mask, modality), model(x, t, text, mask, modality))


def test_real_text_tokens_change_output() -> None:
    model = make_model()
    x, t, modality = torch.randn(2, 4, 1, 8, 8), torch.rand(2), torch.zeros(2, dtype=torch.long)
    text, mask = make_text(2)
    assert not torch.allclose(model(x, t, text, mask, modality), model(x, t, text + 1, mask, modality))


def test_empty_text_row_attends_to_null_caption() -> None:
    model = make_model()
    x, t, modality = torch.randn(2, 4, 1, 8, 8), torch.rand(2), torch.zeros(2, dtype=torch.long)
    text = torch.randn(2, 5, CFG.text_dim)
    empty = torch.zeros(2, 5, dtype=torch.bool)
    null, null_mask = model.null_text(2)
    out = model(x, t, text, empty, modality)
    torch.testing.assert_close(out, model(x, t, null, null_mask, modality))


def test_mixed_audio_and_visual_batch_is_rejected() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="mix"):
        model(torch.randn(2, 4, 1, 8, 8), torch.rand(2), *make_text(2), torch.tensor([0, 2]))


def test_latent_that_does_not_fit_the_patch_is_rejected() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="does not fit"):
        model(torch.randn(2, 4, 1, 7, 8), torch.rand(2), *make_text(2), torch.tensor([0, 0]))


def test_text_longer_than_max_is_rejected() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="max_text_len"):
        model(torch.randn(2, 4, 1, 8, 8), torch.rand(2), *make_text(2, length=9), torch.tensor([0, 0]))


def test_presets_grow_in_size() -> None:
    with torch.device("meta"):
        counts = [count_params(build_dit(name)) for name in DiT_models]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    assert build_dit("DiT-T").cfg.hidden == 128 and build_dit("DiT-T").cfg.depth == 4


def test_preset_overrides() -> None:
    model = build_dit("DiT-T", depth=2, visual_channels=16)
    assert model.cfg.depth == 2 and model.cfg.visual_channels == 16 and len(model.blocks) == 2
    with pytest.raises(ValueError, match="not_a_field"):
        build_dit("DiT-T", not_a_field=1)
    with pytest.raises(ValueError, match="DiT-Q"):
        build_dit("DiT-Q")


def test_config_round_trip_and_unknown_key() -> None:
    assert DiTConfig.from_dict(CFG.to_dict()) == CFG
    with pytest.raises(ValueError, match="hiden"):
        DiTConfig.from_dict({"hiden": 64})
    with pytest.raises(ValueError, match="divisible"):
        DiTConfig(hidden=65, heads=4)
