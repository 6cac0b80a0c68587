from __future__ import annotations

import torch
from torch import Tensor, nn

from latentforge.training.dit import DiT, DiTConfig
from latentforge.training.flow import euler_sample, flow_loss, interpolate, pad_text, sample_timesteps

CFG = DiTConfig(hidden=64, depth=2, heads=4, visual_channels=4, audio_channels=8, text_dim=32, max_text_len=8)


class KnownVelocity(nn.Module):
    """Test double whose velocity is exact for one x0: on the straight path v = (x_t - x0) / t."""

    def __init__(self, x0: Tensor) -> None:
        super().__init__()
        self.x0 = x0
        self.null = nn.Parameter(torch.zeros(1, 1, CFG.text_dim))

    def null_text(self, batch: int) -> tuple[Tensor, Tensor]:
        return self.null.expand(batch, -1, -1), torch.ones(batch, 1, dtype=torch.bool)

    def forward(self, x: Tensor, t: Tensor, text: Tensor, text_mask: Tensor, modality: Tensor) -> Tensor:
        x0 = self.x0.repeat(x.shape[0] // self.x0.shape[0], 1, 1, 1, 1)
        return (x - x0) / t.view(-1, 1, 1, 1, 1)


def batch(b: int = 4) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(b, 4, 1, 8, 8, generator=g)
    text = torch.randn(b, 6, CFG.text_dim, generator=g)
    mask = torch.arange(6)[None] < torch.randint(1, 7, (b, 1), generator=g)
    return x0, text, mask, torch.zeros(b, dtype=torch.long)


def test_sample_timesteps_in_open_unit_interval_and_seeded() -> None:
    t = sample_timesteps(10_000, torch.Generator().manual_seed(0))
    assert t.shape == (10_000,) and (t > 0).all() and (t < 1).all()
    assert abs(t.median().item() - 0.5) < 0.02
    assert torch.equal(t, sample_timesteps(10_000, torch.Generator().manual_seed(0)))
    assert sample_timesteps(10_000, mean=1.0).median() > 0.6


def test_cpu_generator_drives_draws_on_another_device() -> None:
    t = sample_timesteps(4, torch.Generator().manual_seed(0), device="meta")
    assert t.device.type == "meta" and t.shape == (4,)


def test_interpolate_endpoints_and_broadcast() -> None:
    x0, noise = torch.randn(3, 4, 2, 4, 4), torch.randn(3, 4, 2, 4, 4)
    assert torch.equal(interpolate(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(interpolate(x0, noise, torch.ones(3)), noise)
    mid = interpolate(x0, noise, torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(mid[1], (x0[1] + noise[1]) / 2)


def test_pad_text() -> None:
    text, mask = pad_text(torch.ones(2, 1, 5), torch.ones(2, 1, dtype=torch.bool), 4)
    assert text.shape == (2, 4, 5) and text[:, 1:].abs().sum() == 0
    assert mask.tolist() == [[True, False, False, False]] * 2


def test_flow_loss_finite_and_full_dropout_uses_null_text() -> None:
    torch.manual_seed(0)
    model = DiT(CFG)
    x0, text, mask, modality = batch()
    loss = flow_loss(model, x0, text, mask, modality, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    with torch.no_grad():  # let the text reach the output
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    null, null_mask = pad_text(*model.null_text(4), 6)
    dropped = flow_loss(model, x0, text, mask, modality, generator=torch.Generator().manual_seed(0), cond_dropout=1.0)
    by_hand = flow_loss(model, x0, null, null_mask, modality, generator=torch.Generator().manual_seed(0))
    kept = flow_loss(model, x0, text, mask, modality, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(dropped, by_hand)
    assert not torch.allclose(dropped, kept)


def test_flow_loss_decreases_when_overfitting_one_batch() -> None:
    torch.manual_seed(0)
    model = DiT(CFG)
    x0, text, mask, modality = batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def eval_loss() -> float:  # the same 8 (t, noise) draws before and after, to keep the comparison fair
        with torch.no_grad():
            g = torch.Generator().manual_seed(123)
            return sum(flow_loss(model, x0, text, mask, modality, generator=g).item() for _ in range(8))

    initial = eval_loss()
    g = torch.Generator().manual_seed(0)
    for _ in range(150):  # fresh t and noise every step; ~0.33x after 150 steps across seeds
        loss = flow_loss(model, x0, text, mask, modality, generator=g, cond_dropout=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.5 * initial


def test_euler_sample_recovers_x0_with_exact_velocity() -> None:
    x0, text, mask, modality = batch()
    model = KnownVelocity(x0)
    for cfg_scale in (1.0, 4.0):  # cond == uncond here, so guidance must not change the path
        out = euler_sample(model, x0.shape, text, mask, modality, steps=8, cfg_scale=cfg_scale)
        torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)


def test_euler_sample_with_guidance_on_dit() -> None:
    torch.manual_seed(0)
    model = DiT(CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    _, text, mask, _ = batch(2)
    modality = torch.full((2,), 2)
    shape = (2, 8, 5, 1, 1)
    plain = euler_sample(model, shape, text, mask, modality, steps=4, generator=torch.Generator().manual_seed(0))
    guided = euler_sample(
        model, shape, text, mask, modality, steps=4, cfg_scale=3.0, generator=torch.Generator().manual_seed(0)
    )
    assert guided.shape == plain.shape == shape
    assert torch.isfinite(guided).all() and not torch.allclose(guided, plain)
