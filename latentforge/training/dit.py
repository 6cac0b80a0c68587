"""Diffusion transformer (DiT) over (B, C, T, H, W) latents for image, video and audio.

Follows facebookresearch/DiT: adaLN-zero blocks, zero-initialised final layer, presets as a
name -> factory dict. Additions: cross-attention to text tokens, a learned modality embedding,
3D sin-cos positions computed per token grid, and one patch-embed/final-layer pair per latent
family (visual: patch (1, p, p); audio: one token per time step).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGE, VIDEO, AUDIO = 0, 1, 2
NUM_MODALITIES = 3


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of a DiT; every field is plain data so it round-trips through checkpoints."""

    hidden: int = 256  # token width
    depth: int = 6  # number of DiT blocks
    heads: int = 4  # attention heads (hidden must divide evenly)
    mlp_ratio: float = 4.0  # MLP width as a multiple of hidden
    visual_channels: int = 12  # latent channels of image/video latents
    visual_patch: int = 2  # visual latents are patchified with (1, p, p)
    audio_channels: int = 64  # latent channels of audio latents, one token per time step
    text_dim: int = 384  # width of the text encoder's token embeddings
    max_text_len: int = 32  # longest text sequence forward accepts

    def __post_init__(self) -> None:
        for name in ("hidden", "depth", "heads", "visual_patch", "max_text_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by heads={self.heads}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DiTConfig:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown DiTConfig keys: {unknown}")
        return cls(**d)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                      Positional and timestep embeddings                       #
#################################################################################


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


class Attention(nn.Module):
    """Multi-head attention: self-attention when ctx is None, else cross-attention to ctx."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor, ctx: Tensor | None = None, ctx_mask: Tensor | None = None) -> Tensor:
        ctx = x if ctx is None else ctx
        B, N, D = x.shape
        q = self.q(x).view(B, N, self.heads, -1).transpose(1, 2)
        k, v = self.kv(ctx).view(B, ctx.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        mask = None if ctx_mask is None else ctx_mask[:, None, None, :]  # broadcasts to (B, heads, N, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, hidden: int, mlp_ratio: float) -> None:
        super().__init__()
        inner = int(hidden * mlp_ratio)
        self.fc1, self.act, self.fc2 = nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Self-attention, cross-attention to text, MLP; each gated by adaLN-zero on c."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.cross_attn = Attention(hidden, heads)
        self.norm3 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 9 * hidden))

    def forward(self, x: Tensor, c: Tensor, ctx: Tensor, ctx_mask: Tensor) -> Tensor:
        (shift_sa, scale_sa, gate_sa, shift_ca, scale_ca, gate_ca,
         shift_mlp, scale_mlp, gate_mlp) = self.adaLN_modulation(c).chunk(9, dim=1)  # fmt: skip
        x = x + gate_sa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_sa, scale_sa))
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


class DiT(nn.Module):
    """Text-conditioned diffusion transformer predicting the flow velocity for any modality."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = LatentIO(cfg.visual_channels, cfg.visual_patch, cfg.hidden)
        self.audio = LatentIO(cfg.audio_channels, 1, cfg.hidden)
        self.t_embedder = TimestepEmbedder(cfg.hidden)
        self.modality_embed = nn.Embedding(NUM_MODALITIES, cfg.hidden)
        self.text_proj = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.hidden), nn.GELU(approximate="tanh"), nn.Linear(cfg.hidden, cfg.hidden)
        )
        self.null_text_embed = nn.Parameter(torch.zeros(1, 1, cfg.text_dim))
        self.blocks = nn.ModuleList(DiTBlock(cfg.hidden, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.modality_embed.weight, std=0.02)
        nn.init.normal_(self.null_text_embed, std=0.02)
        # adaLN-zero: every block starts as the identity and the model predicts zero.
        zero_init = [block.adaLN_modulation[-1] for block in self.blocks]
        for io in (self.visual, self.audio):
            zero_init += [io.final.adaLN_modulation[-1], io.final.linear]
        for layer in zero_init:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def null_text(self, batch: int) -> tuple[Tensor, Tensor]:
        """Learned null caption (B, 1, text_dim) and its all-True mask, for caption dropout and CFG."""
        mask = torch.ones(batch, 1, dtype=torch.bool, device=self.null_text_embed.device)
        return self.null_text_embed.expand(batch, -1, -1), mask

    def family(self, modality: Tensor) -> LatentIO:
        n_audio = int((modality == AUDIO).sum())
        if n_audio not in (0, modality.numel()):
            raise ValueError("a batch must not mix audio with image/video latents")
        return self.audio if n_audio else self.visual

    def encode_text(self, text: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Project text tokens; returns (tokens, mask, masked mean) with empty rows given the null token."""
        if text.shape[1] > self.cfg.max_text_len:
            raise ValueError(f"text length {text.shape[1]} exceeds max_text_len={self.cfg.max_text_len}")
        mask = text_mask.bool()
        # A row with no real token would make attention softmax over nothing (NaN);
        # it attends to the null caption in slot 0 instead. Branch-free to avoid a host sync.
        swap = torch.zeros_like(mask)
        swap[:, 0] = ~mask.any(dim=1)
        text = torch.where(swap[..., None], self.null_text_embed.to(text.dtype), text)
        mask = mask | swap
        tokens = self.text_proj(text)
        pooled = torch.where(mask[..., None], tokens, 0).sum(1) / mask.sum(1, keepdim=True)
        return tokens, mask, pooled

    def forward(self, x: Tensor, t: Tensor, text: Tensor, text_mask: Tensor, modality: Tensor) -> Tensor:
        """x (B, C, T, H, W), t (B,) in [0, 1], text (B, L, D_text), text_mask (B, L), modality (B,) -> v like x."""
        io = self.family(modality)
        grid = io.grid(x)
        ctx, ctx_mask, pooled = self.encode_text(text, text_mask)
        m = self.modality_embed(modality)
        c = self.t_embedder(t) + m + pooled
        h = io.embed(io.patchify(x))
        h = h + sincos_3d(self.cfg.hidden, grid, h.device).to(h.dtype) + m.unsqueeze(1)
        for block in self.blocks:
            h = block(h, c, ctx, ctx_mask)
        return io.unpatchify(io.final(h, c), grid)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


#################################################################################
#                                  DiT Configs                                  #
#################################################################################


def _preset(**arch: Any) -> Callable[..., DiT]:
    def factory(**overrides: Any) -> DiT:
        return DiT(DiTConfig.from_dict({**arch, **overrides}))

    return factory


DiT_archs: dict[str, dict[str, Any]] = {
    "DiT-T": dict(hidden=128, depth=4, heads=4),
    "DiT-S": dict(hidden=384, depth=12, heads=6),
    "DiT-B": dict(hidden=768, depth=12, heads=12),
    "DiT-L": dict(hidden=1024, depth=24, heads=16),
    "DiT-XL": dict(hidden=1152, depth=28, heads=16),
}
DiT_T = _preset(**DiT_archs["DiT-T"])
DiT_S = _preset(**DiT_archs["DiT-S"])
DiT_B = _preset(**DiT_archs["DiT-B"])
DiT_L = _preset(**DiT_archs["DiT-L"])
DiT_XL = _preset(**DiT_archs["DiT-XL"])

DiT_models: dict[str, Callable[..., DiT]] = {
    "DiT-T": DiT_T,
    "DiT-S": DiT_S,
    "DiT-B": DiT_B,
    "DiT-L": DiT_L,
    "DiT-XL": DiT_XL,
}


def build_dit(preset: str, **overrides: Any) -> DiT:
    """Build a preset by name; overrides replace any DiTConfig field (unknown fields raise)."""
    if preset not in DiT_models:
        raise ValueError(f"unknown DiT preset {preset!r}; choose from {sorted(DiT_models)}")
    return DiT_models[preset](**overrides)
