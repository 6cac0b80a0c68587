"""The building blocks of the DiT: adaLN-zero blocks, timestep embedding, per-family patch I/O, token masking.

Kept apart from `dit.py` (the model, its config and presets) so each file reads as one thing; the names follow
facebookresearch/DiT where they exist there.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from latentforge.training.attention import Attention, Rope


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                              Timestep embedding                               #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Embeds flow times t in [0, 1] into vectors (DiT's frequency embedding + MLP)."""

    def __init__(self, hidden: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    @staticmethod
    def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000) -> Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([args.cos(), args.sin()], dim=-1)

    def forward(self, t: Tensor) -> Tensor:
        # Scaled to DiT's integer-timestep range so the frequencies stay well spread.
        freq = self.timestep_embedding(t * 1000, self.frequency_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


#################################################################################
#                                 Core DiT model                                #
#################################################################################


class Mlp(nn.Module):
    def __init__(self, hidden: int, mlp_ratio: float) -> None:
        super().__init__()
        inner = int(hidden * mlp_ratio)
        self.fc1, self.act, self.fc2 = nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Self-attention, cross-attention to text, MLP; each gated by adaLN-zero on c."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, *, qk_norm: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.cross_attn = Attention(hidden, heads, qk_norm=qk_norm)
        self.norm3 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 9 * hidden))

    def forward(self, x: Tensor, c: Tensor, ctx: Tensor, ctx_mask: Tensor, rope: Rope | None = None) -> Tensor:
        (shift_sa, scale_sa, gate_sa, shift_ca, scale_ca, gate_ca,
         shift_mlp, scale_mlp, gate_mlp) = self.adaLN_modulation(c).chunk(9, dim=1)  # fmt: skip
        x = x + gate_sa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_sa, scale_sa), rope=rope)
        x = x + gate_ca.unsqueeze(1) * self.cross_attn(modulate(self.norm2(x), shift_ca, scale_ca), ctx, ctx_mask)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class LatentIO(nn.Module):
    """Patch embedding in and final layer out for one latent family, patches of (1, p, p)."""

    def __init__(self, channels: int, patch: int, hidden: int) -> None:
        super().__init__()
        self.channels, self.patch = channels, patch
        self.embed = nn.Linear(channels * patch * patch, hidden)
        self.final = FinalLayer(hidden, channels * patch * patch)

    def grid(self, x: Tensor) -> tuple[int, int, int]:
        _, C, T, H, W = x.shape
        p = self.patch
        if C != self.channels or H % p or W % p:
            raise ValueError(f"latent {tuple(x.shape)} does not fit channels={C} patch=(1, {p}, {p})")
        return T, H // p, W // p

    def patchify(self, x: Tensor) -> Tensor:
        (B, C, T, H, W), p = x.shape, self.patch
        x = x.reshape(B, C, T, H // p, p, W // p, p).permute(0, 2, 3, 5, 1, 4, 6)  # B T h w C p p
        return x.reshape(B, T * (H // p) * (W // p), C * p * p)

    def unpatchify(self, x: Tensor, grid: tuple[int, int, int]) -> Tensor:
        (T, h, w), p, C = grid, self.patch, self.channels
        x = x.reshape(x.shape[0], T, h, w, C, p, p).permute(0, 4, 1, 2, 5, 3, 6)  # B C T h p w p
        return x.reshape(x.shape[0], C, T, h * p, w * p)


def random_keep(
    batch: int, num_tokens: int, mask_ratio: float, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """(B, n) sorted indices of a random token subset per sample; n = round(N * (1 - mask_ratio)), at least 1."""
    if not 0 <= mask_ratio < 1:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    keep = max(1, round(num_tokens * (1 - mask_ratio)))
    # Drawn on the generator's device so a CPU generator drives CUDA training (as in flow._draw).
    source = generator.device if generator is not None else device
    scores = torch.rand(batch, num_tokens, generator=generator, device=source)
    return scores.to(device).argsort(dim=1)[:, :keep].sort(dim=1).values


def scatter_tokens(x: Tensor, index: Tensor, num_tokens: int) -> Tensor:
    """x (B, n, D) placed at rows `index` (B, n) of zeros (B, num_tokens, D): the inverse of gather_tokens."""
    full = x.new_zeros(x.shape[0], num_tokens, x.shape[2])
    return full.scatter(1, index[..., None].expand(-1, -1, x.shape[2]), x)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """Rows `index` (B, n) of x (B, N, D) or of a shared table x (N, D) -> (B, n, D)."""
    if x.dim() == 2:
        return x[index]
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
