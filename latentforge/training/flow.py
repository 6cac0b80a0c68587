"""Rectified flow: x_t = (1 - t) x0 + t noise, the model predicts the velocity noise - x0.

t = 0 is data, t = 1 is noise; sampling integrates from t = 1 down to t = 0 (Euler or Heun), on a time grid
that an SD3 timestep shift can bend towards noise for larger latents.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Literal

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


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """SD3's time shift t' = shift * t / (1 + (shift - 1) * t): fixes 0 and 1, shift > 1 moves t towards noise."""
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(num_tokens: int, base_tokens: int = 256, base_shift: float = 1.0) -> float:
    """Shift for a latent of `num_tokens` tokens: base_shift * sqrt(num_tokens / base_tokens).

    SD3 (Esser et al. 2024, sec. 5.3.2) shifts by sqrt(m / n) for m pixels against a reference of n: more
    tokens carry more redundant signal, so the same t destroys less of it and training needs noisier times.
    Token counts stand in for pixels here; base_shift is the shift the base resolution was trained with.
    """
    if num_tokens < 1 or base_tokens < 1:
        raise ValueError(f"token counts must be positive, got {num_tokens} and {base_tokens}")
    return base_shift * math.sqrt(num_tokens / base_tokens)


def flow_loss(
    model: nn.Module,
    x0: Tensor,
    text: Tensor,
    text_mask: Tensor,
    modality: Tensor,
    *,
    generator: torch.Generator | None = None,
    cond_dropout: float = 0.0,
    timestep_shift: float | None = None,
    mask_ratio: float = 0.0,
) -> Tensor:
    """MSE between the predicted and the true velocity at a logit-normal t; drops captions with p=cond_dropout.

    timestep_shift (see resolution_shift) shifts the sampled t; mask_ratio > 0 drops that share of the tokens
    after the model's patch mixer and takes the loss over the kept patches only (DiT.forward_masked).
    """
    x_t, t, target, text, text_mask = flow_inputs(model, x0, text, text_mask, generator=generator,
                                                  cond_dropout=cond_dropout, timestep_shift=timestep_shift)
    if mask_ratio > 0:  # through model(...), not .forward_masked, so DDP wrappers still sync gradients
        pred, keep = model(x_t, t, text, text_mask, modality, mask_ratio=mask_ratio, generator=generator)
        return ((pred.float() - target).square() * keep).sum() / keep.sum()  # no boolean indexing: no host sync
    return F.mse_loss(model(x_t, t, text, text_mask, modality).float(), target)


def flow_inputs(
    model: nn.Module,
    x0: Tensor,
    text: Tensor,
    text_mask: Tensor,
    *,
    generator: torch.Generator | None,
    cond_dropout: float,
    timestep_shift: float | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(x_t, t, target velocity, text, text_mask) of one training step: the random draws of flow_loss, in order."""
    t = sample_timesteps(x0.shape[0], generator, device=x0.device)
    if timestep_shift is not None:
        t = shift_timesteps(t, timestep_shift)
    noise = _draw(torch.randn, x0.shape, generator, x0.device).to(x0.dtype)
    if cond_dropout > 0:
        null, null_mask = null_text_like(model, text)
        drop = _draw(torch.rand, (x0.shape[0],), generator, x0.device) < cond_dropout
        text = torch.where(drop[:, None, None], null, text)
        text_mask = torch.where(drop[:, None], null_mask, text_mask.bool())
    return interpolate(x0, noise, t), t, (noise - x0).float(), text, text_mask


def flow_repa_loss(
    model: nn.Module,
    x0: Tensor,
    text: Tensor,
    text_mask: Tensor,
    modality: Tensor,
    repa_target: Tensor,
    *,
    generator: torch.Generator | None = None,
    cond_dropout: float = 0.0,
    timestep_shift: float | None = None,
    mask_ratio: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """(flow loss, REPA loss) of one forward pass; the flow term is exactly flow_loss's.

    repa_target (B, N, D): encoder features per DiT token (see align_repa_targets); with token masking only
    the kept tokens count.
    """
    x_t, t, target, text, text_mask = flow_inputs(model, x0, text, text_mask, generator=generator,
                                                  cond_dropout=cond_dropout, timestep_shift=timestep_shift)
    out = model(x_t, t, text, text_mask, modality, mask_ratio=mask_ratio, generator=generator, features=True)
    if out.keep_mask is None:
        flow = F.mse_loss(out.velocity.float(), target)
    else:
        flow = ((out.velocity.float() - target).square() * out.keep_mask).sum() / out.keep_mask.sum()
    grid = getattr(model, "module", model).family(x0, modality).grid(x0)
    return flow, repa_loss(out.features, align_repa_targets(repa_target, grid), out.keep_tokens)


def align_repa_targets(features: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """Encoder features (B, N, D) -> (B, T*h*w, D) in the DiT's token order (frame, row, column).

    N equal to the token count is used as is. Otherwise N must be T square grids (the usual ViT patch grid
    per frame, e.g. DINOv2's 16x16 at 224 px), which are resized bilinearly to each frame's (h, w) token grid.
    """
    T, h, w = grid
    B, N, D = features.shape
    if N == T * h * w:
        return features
    side = math.isqrt(N // T) if N % T == 0 else 0
    if side * side * T != N:
        raise ValueError(f"REPA features have {N} tokens; the latent has {T}x{h}x{w} = {T * h * w} tokens "
                         f"(give exactly that many, or {T} square grids per sample)")
    grids = features.float().reshape(B * T, side, side, D).permute(0, 3, 1, 2)
    resized = F.interpolate(grids, size=(h, w), mode="bilinear", align_corners=False)
    return resized.permute(0, 2, 3, 1).reshape(B, T * h * w, D)


@torch.no_grad()
def validation_loss(
    model: nn.Module,
    x0: Tensor,
    text: Tensor,
    text_mask: Tensor,
    modality: Tensor,
    *,
    timesteps: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
    seed: int = 0,
) -> dict[float, float]:
    """Flow loss at fixed times with noise from a fixed seed: comparable from one training step to the next."""
    noise = _draw(torch.randn, x0.shape, torch.Generator().manual_seed(seed), x0.device).to(x0.dtype)
    target = (noise - x0).float()
    losses = {}
    for time in timesteps:
        t = torch.full((x0.shape[0],), float(time), device=x0.device)
        pred = model(interpolate(x0, noise, t), t, text, text_mask, modality)
        losses[float(time)] = F.mse_loss(pred.float(), target).item()
    return losses


def repa_loss(projected: Tensor, target_features: Tensor, mask: Tensor | None = None) -> Tensor:
    """REPA alignment: minus the mean cosine similarity per token of (B, N, D) features, in [-1, 1].

    mask (B, N), True for tokens to count, e.g. DiTOutput.keep_tokens of a masked forward.
    """
    similarity = F.cosine_similarity(projected.float(), target_features.float(), dim=-1)
    if mask is None:
        return -similarity.mean()
    mask = mask.bool()
    return -(similarity * mask).sum() / mask.sum().clamp(min=1)


Velocity = Callable[[Tensor, Tensor], Tensor]


def guided_velocity(model: nn.Module, text: Tensor, text_mask: Tensor, modality: Tensor, cfg_scale: float) -> Velocity:
    """v(x, t) for a scalar t, with classifier-free guidance when cfg_scale != 1 (cond and uncond in one batch)."""
    guided = cfg_scale != 1.0
    if guided:
        null, null_mask = null_text_like(model, text)
        text, text_mask = torch.cat([text, null]), torch.cat([text_mask.bool(), null_mask])
        modality = torch.cat([modality, modality])

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        x_in = torch.cat([x, x]) if guided else x
        v = model(x_in, t.expand(x_in.shape[0]), text, text_mask, modality)
        if not guided:
            return v
        v_c, v_u = v.chunk(2)
        return v_u + cfg_scale * (v_c - v_u)

    return velocity


def time_grid(steps: int, timestep_shift: float | None, device: Device) -> Tensor:
    """steps + 1 times from 1 (noise) down to 0 (data), uniform unless shifted."""
    times = torch.linspace(1.0, 0.0, steps + 1, device=device)
    return times if timestep_shift is None else shift_timesteps(times, timestep_shift)


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
    timestep_shift: float | None = None,
) -> Tensor:
    """Integrate dx/dt = v from noise at t = 1 to data at t = 0 in `steps` Euler steps (CFG if cfg_scale != 1)."""
    velocity = guided_velocity(model, text, text_mask, modality, cfg_scale)
    x = _draw(torch.randn, shape, generator, text.device)
    times = time_grid(steps, timestep_shift, text.device)
    for t, t_next in pairwise(times):
        x = x + (t_next - t) * velocity(x, t)
    return x


@torch.no_grad()
def heun_sample(
    model: nn.Module,
    shape: tuple[int, ...],
    text: Tensor,
    text_mask: Tensor,
    modality: Tensor,
    *,
    steps: int = 20,
    cfg_scale: float = 1.0,
    generator: torch.Generator | None = None,
    timestep_shift: float | None = None,
) -> Tensor:
    """Like euler_sample with Heun's 2nd-order steps: 2 * steps - 1 model calls.

    As in EDM (Karras et al. 2022) the last step, onto t = 0, stays an Euler step.
    """
    velocity = guided_velocity(model, text, text_mask, modality, cfg_scale)
    x = _draw(torch.randn, shape, generator, text.device)
    times = time_grid(steps, timestep_shift, text.device)
    for i, (t, t_next) in enumerate(pairwise(times)):
        v = velocity(x, t)
        x_euler = x + (t_next - t) * v
        x = x_euler if i == steps - 1 else x + (t_next - t) * (v + velocity(x_euler, t_next)) / 2
    return x


SAMPLERS = {"euler": euler_sample, "heun": heun_sample}


def sample(
    model: nn.Module,
    shape: tuple[int, ...],
    text: Tensor,
    text_mask: Tensor,
    modality: Tensor,
    *,
    method: Literal["euler", "heun"] = "euler",
    steps: int = 20,
    cfg_scale: float = 1.0,
    generator: torch.Generator | None = None,
    timestep_shift: float | None = None,
) -> Tensor:
    """euler_sample or heun_sample by name."""
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampling method {method!r}; choose from {sorted(SAMPLERS)}")
    return SAMPLERS[method](
        model,
        shape,
        text,
        text_mask,
        modality,
        steps=steps,
        cfg_scale=cfg_scale,
        generator=generator,
        timestep_shift=timestep_shift,
    )
