"""Rectified flow: x_t = (1 - t) x0 + t noise, the model predicts the velocity noise - x0.

t = 0 is data, t = 1 is noise; sampling integrates from t = 1 down to t = 0.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Device = torch.device | str | None


def _draw(
    sample: Callable[..., Tensor], shape: tuple[int, ...], generator: torch.Generator | None, device: Device
) -> Tensor:
    """torch.randn / torch.rand on the generator's device, then moved to `device`."""
    # torch refuses a generator on another device; drawing on the generator's side lets a CPU
    # generator drive CUDA training and gives the same draws on every device.
    source = generator.device if generator is not None else device
    out = sample(shape, generator=generator, device=source)
    return out if device is None else out.to(device)


def sample_timesteps(
    batch: int,
    generator: torch.Generator | None = None,
    *,
    mean: float = 0.0,
    std: float = 1.0,
    device: Device = None,
) -> Tensor:
    """Logit-normal times in (0, 1): sigmoid of N(mean, std^2)."""
    return torch.sigmoid(_draw(torch.randn, (batch,), generator, device) * std + mean)


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) * x0 + t * noise, with t (B,) broadcast over the non-batch dims."""
    t = t.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * noise


def pad_text(text: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Right-pad text (B, L, D) with zeros and mask (B, L) with False to `length` tokens."""
    extra = length - text.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad text of length {text.shape[1]} down to {length}")
    return F.pad(text, (0, 0, 0, extra)), F.pad(mask.bool(), (0, extra), value=False)


def null_text_like(model: nn.Module, text: Tensor) -> tuple[Tensor, Tensor]:
    """The model's null caption for every row of `text`, padded to its length."""
    # DDP/FSDP wrappers hide the model's own methods behind .module.
    null, null_mask = getattr(model, "module", model).null_text(text.shape[0])
    return pad_text(null.to(device=text.device, dtype=text.dtype), null_mask.to(text.device), text.shape[1])


def flow_loss(
    model: nn.Module,
    x0: Tensor,
    text: Tensor,
    text_mask: Tensor,
    modality: Tensor,
    *,
    generator: torch.Generator | None = None,
    cond_dropout: float = 0.0,
) -> Tensor:
    """MSE between the predicted and the true velocity at a logit-normal t; drops captions with p=cond_dropout."""
    t = sample_timesteps(x0.shape[0], generator, device=x0.device)
    noise = _draw(torch.randn, x0.shape, generator, x0.device).to(x0.dtype)
    if cond_dropout > 0:
        null, null_mask = null_text_like(model, text)
        drop = _draw(torch.rand, (x0.shape[0],), generator, x0.device) < cond_dropout
        text = torch.where(drop[:, None, None], null, text)
        text_mask = torch.where(drop[:, None], null_mask, text_mask.bool())
    pred = model(interpolate(x0, noise, t), t, text, text_mask, modality)
    return F.mse_loss(pred.float(), (noise - x0).float())


@torch.no_grad()
def euler_sample(
    model: nn.Module,
    shape: tuple[int, ...],
    text: Tensor,
    text_mask: Tensor,
    modality: Tensor,
    *,
    steps: int = 20,
    cfg_scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Integrate dx/dt = v from noise at t = 1 to data at t = 0 in `steps` Euler steps (CFG if cfg_scale != 1)."""
    device = text.device
    x = _draw(torch.randn, shape, generator, device)
    times = torch.linspace(1.0, 0.0, steps + 1, device=device)
    guided = cfg_scale != 1.0
    if guided:  # cond and uncond rows in one batch
        null, null_mask = null_text_like(model, text)
        text, text_mask = torch.cat([text, null]), torch.cat([text_mask.bool(), null_mask])
        modality = torch.cat([modality, modality])
    for t, t_next in zip(times[:-1], times[1:]):
        x_in = torch.cat([x, x]) if guided else x
        v = model(x_in, t.expand(x_in.shape[0]), text, text_mask, modality)
        if guided:
            v_c, v_u = v.chunk(2)
            v = v_u + cfg_scale * (v_c - v_u)
        x = x + (t_next - t) * v
    return x
