"""Attention and token positions for the DiT: multi-head attention with QK-norm, 3D RoPE, 3D sin-cos.

RoPE (Su et al. 2021) rotates channel pairs (2i, 2i + 1) of q and k by angles proportional to a token's
position, so the score q_i . k_j depends on the offset between tokens i and j, never on where they are.
Over a (T, H, W) grid the head_dim / 2 pairs are split between the axes: h and w get head_dim // 6 pairs
each, t gets the rest (head_dim 64: t 24 channels, h 20, w 20; head_dim 72: 24 each). head_dim must be
even (pairs) and at least 6 (a pair per axis). Audio grids are (T, 1, 1): their h and w channels stay
unrotated and carry content only. The sin-cos alternative is an absolute embedding added to the tokens.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROPE_THETA = 10000.0
Rope = tuple[Tensor, Tensor]  # cos, sin: (N, head_dim // 2), or (B, N, head_dim // 2) after token masking


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """(N,) positions -> (N, dim) sin-cos embedding; dim must be even."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.double()[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


@lru_cache(maxsize=64)
def sincos_3d(dim: int, grid: tuple[int, int, int], device: torch.device) -> Tensor:
    """(T*H*W, dim) fixed embedding of a (T, H, W) token grid, flattened T-major like the tokens."""
    # A quarter of the channels for time, the rest split between height and width;
    # whatever rounding leaves over stays zero.
    d_t = 2 * (dim // 8)
    d_s = 2 * ((dim - d_t) // 4)
    t, h, w = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    emb = torch.cat([sincos_1d(d_t, t.flatten()), sincos_1d(d_s, h.flatten()), sincos_1d(d_s, w.flatten())], 1)
    return F.pad(emb, (0, dim - emb.shape[1])).float().to(device)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of one head given to (t, h, w): 2 * (head_dim // 6) to h and to w, the rest to t."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"rope needs an even head_dim of at least 6 (a channel pair per axis), got {head_dim}")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


@lru_cache(maxsize=64)
def rope_tables(head_dim: int, grid: tuple[int, int, int], device: torch.device) -> Rope:
    """cos and sin (T*H*W, head_dim // 2) float32 for a (T, H, W) grid, flattened T-major like the tokens."""
    # Cached tables are saved for backward by later training steps, so they must never be inference tensors.
    with torch.inference_mode(False):
        coords = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in grid), indexing="ij")
        angles = []
        for dim, pos in zip(rope_split(head_dim), coords):
            omega = ROPE_THETA ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
            angles.append(pos.flatten()[:, None] * omega[None])
        angle = torch.cat(angles, dim=1)
        return angle.cos().float().to(device), angle.sin().float().to(device)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs of x (B, heads, N, head_dim) by the tables' angles, in float32."""
    if cos.dim() == 3:  # per-sample tables (masked tokens): broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


class QKNorm(nn.RMSNorm):
    """RMSNorm over a head's channels, run in the input's dtype.

    Under autocast q and k arrive in bf16 while the weight stays float32, and torch's fused RMSNorm kernel
    refuses mixed dtypes (it falls back to several unfused kernels, and warns); the weight is cast to the input's
    dtype instead. The parameter is unchanged, so checkpoints load either way."""

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class Attention(nn.Module):
    """Multi-head attention: self-attention when ctx is None, else cross-attention to ctx.

    With qk_norm, q and k are RMS-normalised per head (SD3, ViT-22B) so attention logits cannot grow
    without bound; rope (self-attention only) rotates them by token position after the norm.
    """

    def __init__(self, hidden: int, heads: int, *, qk_norm: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        head_dim = hidden // heads
        self.q_norm = QKNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = QKNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def forward(
        self, x: Tensor, ctx: Tensor | None = None, ctx_mask: Tensor | None = None, *, rope: Rope | None = None
    ) -> Tensor:
        B, N, D = x.shape
        if ctx is None:  # self-attention: q, k and v from one GEMM (parameters stay q and kv: checkpoints load)
            qkv = F.linear(x, torch.cat([self.q.weight, self.kv.weight]), torch.cat([self.q.bias, self.kv.bias]))
            q, k, v = qkv.view(B, N, 3, self.heads, -1).unbind(2)
        else:
            q = self.q(x).view(B, N, self.heads, -1)
            k, v = self.kv(ctx).view(B, ctx.shape[1], 2, self.heads, -1).unbind(2)
        # (B, heads, N, head_dim) views with a contiguous last dim: what SDPA's flash / efficient kernels take.
        q, k, v = self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2), v.transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # No mask at all in self-attention: an explicit mask would rule out the flash kernel.
        mask = None if ctx_mask is None else ctx_mask[:, None, None, :]  # broadcasts to (B, heads, N, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))
