"""Deferred token masking behind a patch mixer (DiT.forward_masked, flow_loss(mask_ratio=...))."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from latentforge.training.dit import DiT, DiTConfig
from latentforge.training.flow import flow_loss

CFG = DiTConfig(
    hidden=64, depth=2, heads=4, visual_channels=4, audio_channels=8, text_dim=32, max_text_len=8, mixer_depth=1
)


def make_model(**overrides) -> DiT:
    """A tiny DiT with a one-block mixer, perturbed so adaLN-zero does not hide the inputs from the output."""
    torch.manual_seed(0)
    model = DiT(dataclasses.replace(CFG, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def inputs(shape: tuple[int, ...] = (3, 4, 2, 8, 8), modality: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    text = torch.randn(shape[0], 5, CFG.text_dim, generator=g)
    return (
        torch.randn(shape, generator=g),
        torch.rand(shape[0], generator=g),
        text,
        torch.ones(shape[0], 5, dtype=torch.bool),
        torch.full((shape[0],), modality),
    )


def token_counts(module: torch.nn.Module, counts: list[int]) -> None:
    module.register_forward_pre_hook(lambda _, args: counts.append(args[0].shape[1]))


def test_backbone_sees_half_the_tokens_and_the_mixer_all() -> None:
    model = make_model()
    mixer, backbone = [], []
    token_counts(model.mixer[0], mixer)
    token_counts(model.blocks[0], backbone)
    x, *rest = inputs()  # 2 * 4 * 4 = 32 tokens
    v, keep = model(x, *rest, mask_ratio=0.5, generator=torch.Generator().manual_seed(0))
    assert mixer == [32] and backbone == [16]
    assert v.shape == keep.shape == x.shape and keep.dtype == torch.bool
    assert (keep.sum(dim=(1, 2, 3, 4)) == x[0].numel() // 2).all()  # the same count for every sample
    assert not torch.equal(keep[0], keep[1])  # but a different subset
    assert v[~keep].abs().max() == 0 and v[keep].abs().min() > 0
    patch_keep = keep[:, :, :, ::2, ::2]  # a patch is kept or dropped as a whole (patch 2, all channels)
    assert torch.equal(keep, patch_keep.repeat_interleave(2, 3).repeat_interleave(2, 4))
    assert torch.equal(keep, keep[:, :1].expand_as(keep))


def test_mask_is_drawn_from_the_generator() -> None:
    model = make_model()
    masks = [
        model.forward_masked(*inputs(), mask_ratio=0.75, generator=torch.Generator().manual_seed(s))[1]
        for s in (0, 0, 1)
    ]
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    assert masks[0][0].float().mean() == 0.25


def test_default_call_returns_the_prediction_and_eval_keeps_every_token() -> None:
    model = make_model()
    full = model(*inputs())
    assert isinstance(full, torch.Tensor)
    model.eval()
    v, keep = model(*inputs(), mask_ratio=0.5)
    assert keep.all()
    torch.testing.assert_close(v, full)


def test_keeping_every_token_matches_the_unmasked_forward() -> None:
    """A ratio small enough to keep all 32 tokens takes the gather/scatter path and changes nothing."""
    model = make_model()
    v, keep = model(*inputs(), mask_ratio=0.01, generator=torch.Generator().manual_seed(0))
    assert keep.all()
    torch.testing.assert_close(v, model(*inputs()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos_embed", ["rope", "sincos"])
@pytest.mark.parametrize("shape,modality", [((3, 4, 2, 8, 8), 1), ((3, 8, 12, 1, 1), 2)], ids=["video", "audio"])
def test_masked_flow_loss_is_finite_and_trains_the_mixer(shape, modality, pos_embed: str) -> None:
    model = make_model(pos_embed=pos_embed)
    x0, _, text, mask, mod = inputs(shape, modality)
    loss = flow_loss(model, x0, text, mask, mod, generator=torch.Generator().manual_seed(0), mask_ratio=0.5)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in model.mixer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_masked_loss_counts_only_kept_patches() -> None:
    """The masked loss equals the MSE over kept patches, computed by hand from forward_masked."""
    model = make_model()
    x0, _, text, mask, mod = inputs()
    loss = flow_loss(model, x0, text, mask, mod, generator=torch.Generator().manual_seed(3), mask_ratio=0.5)
    g = torch.Generator().manual_seed(3)  # replay flow_loss's draws: t, noise, then the mask
    t = torch.sigmoid(torch.randn(3, generator=g))
    noise = torch.randn(x0.shape, generator=g)
    x_t = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise
    v, keep = model.forward_masked(x_t, t, text, mask, mod, mask_ratio=0.5, generator=g)
    torch.testing.assert_close(loss, ((v - (noise - x0))[keep] ** 2).mean())


def test_invalid_mask_ratio_is_rejected() -> None:
    with pytest.raises(ValueError, match="mask_ratio"):
        make_model()(*inputs(), mask_ratio=1.0)


def test_masked_repa_features_line_up_with_the_kept_tokens() -> None:
    from latentforge.training.flow import repa_loss

    model = make_model(repa_depth=1, repa_dim=16)
    out = model.forward_output(*inputs(), mask_ratio=0.5, generator=torch.Generator().manual_seed(0), features=True)
    assert out.features.shape == (3, 32, 16) and out.keep_tokens.shape == (3, 32)
    assert (out.keep_tokens.sum(1) == 16).all()
    assert out.features[~out.keep_tokens].abs().max() == 0 and out.features[out.keep_tokens].abs().min() > 0
    tokens_of_patches = out.keep_mask[:, 0, :, ::2, ::2].flatten(1)  # (B, T*h*w), T-major like the tokens
    assert torch.equal(tokens_of_patches, out.keep_tokens)
    target = torch.randn(3, 32, 16)
    loss = repa_loss(out.features, target, out.keep_tokens)
    assert -1 <= loss.item() <= 1
