"""Diffusion transformer (DiT) over (B, C, T, H, W) latents for image, video and audio.

Follows facebookresearch/DiT: adaLN-zero blocks, zero-initialised final layer, presets as a
name -> factory dict. Additions: cross-attention to text tokens, a learned modality embedding,
3D rotary (default) or sin-cos positions per token grid, QK-norm, one patch-embed/final-layer pair per
latent family (visual: patch (1, p, p); audio: one token per time step), deferred token masking behind a
patch mixer (Sehwag et al. 2024) and a REPA projector (Yu et al. 2024).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from latentforge.training.attention import Rope, rope_split, rope_tables, sincos_3d
from latentforge.training.layers import (
    DiTBlock,
    LatentIO,
    TimestepEmbedder,
    gather_tokens,
    random_keep,
    scatter_tokens,
)

IMAGE, VIDEO, AUDIO = 0, 1, 2
NUM_MODALITIES = 3


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of a DiT; every field is plain data so it round-trips through checkpoints."""

    hidden: int = 256  # token width
    depth: int = 6  # number of DiT blocks in the backbone
    heads: int = 4  # attention heads (hidden must divide evenly)
    mlp_ratio: float = 4.0  # MLP width as a multiple of hidden
    visual_channels: int = 12  # latent channels of image/video latents
    visual_patch: int = 2  # visual latents are patchified with (1, p, p)
    audio_channels: int = 64  # latent channels of audio latents, one token per time step
    text_dim: int = 384  # width of the text encoder's token embeddings
    max_text_len: int = 32  # longest text sequence forward accepts
    pos_embed: Literal["rope", "sincos"] = "rope"  # rotary q/k in self-attention, or absolute sin-cos on tokens
    qk_norm: bool = True  # RMSNorm on q and k per head before attention
    grad_checkpointing: bool = False  # recompute each block in backward while training (saves activations)
    mixer_depth: int = 0  # patch mixer: DiT blocks run on all tokens before token masking
    repa_depth: int = 0  # REPA: project the hidden states after this backbone block (0 with repa_dim 0: off)
    repa_dim: int = 0  # REPA: width of the encoder features the projector maps to

    def __post_init__(self) -> None:
        for name, low in [(n, 1) for n in ("hidden", "depth", "heads", "visual_patch", "max_text_len")] + [
            (n, 0) for n in ("mixer_depth", "repa_depth", "repa_dim")
        ]:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("qk_norm", "grad_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by heads={self.heads}")
        if self.pos_embed not in ("rope", "sincos"):
            raise ValueError(f"pos_embed must be 'rope' or 'sincos', got {self.pos_embed!r}")
        if self.pos_embed == "rope":
            try:
                rope_split(self.hidden // self.heads)
            except ValueError as e:
                raise ValueError(f"hidden={self.hidden}, heads={self.heads}: {e}") from None
        if (self.repa_depth > 0) != (self.repa_dim > 0):
            raise ValueError(f"set repa_depth and repa_dim together, got {self.repa_depth} and {self.repa_dim}")
        if self.repa_depth > self.depth:
            raise ValueError(f"repa_depth={self.repa_depth} exceeds depth={self.depth}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DiTConfig:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown DiTConfig keys: {unknown}")
        return cls(**d)


class DiTOutput(NamedTuple):
    velocity: Tensor  # like x; zero at patches dropped by token masking
    keep_mask: Tensor | None  # bool like x, True where the patch went through the backbone; None: all did
    keep_tokens: Tensor | None  # the same per token, bool (B, N); None: all tokens were kept
    features: Tensor | None  # (B, N, repa_dim) REPA projections when asked for; zero at dropped tokens


class DiT(nn.Module):
    """Text-conditioned diffusion transformer predicting the flow velocity for any modality.

    Tokens pass `mixer` blocks (all tokens), are optionally subsampled (token masking while training),
    then pass the backbone `blocks`. With no mixer and no masking this is the plain DiT.
    """

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
        self.mixer = nn.ModuleList(self._block() for _ in range(cfg.mixer_depth))
        self.blocks = nn.ModuleList(self._block() for _ in range(cfg.depth))
        self.repa_projector = repa_projector(cfg.hidden, cfg.repa_dim) if cfg.repa_depth else None
        # FSDP: every rank must produce a gradient for every parameter of a sharded unit, even when one rank's
        # batch is audio and another's visual; True adds 0 * the unused family's parameters to the output.
        self.grad_all_families = False
        self.initialize_weights()

    def _block(self) -> DiTBlock:
        return DiTBlock(self.cfg.hidden, self.cfg.heads, self.cfg.mlp_ratio, qk_norm=self.cfg.qk_norm)

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
        zero_init = [block.adaLN_modulation[-1] for block in (*self.mixer, *self.blocks)]
        for io in (self.visual, self.audio):
            zero_init += [io.final.adaLN_modulation[-1], io.final.linear]
        for layer in zero_init:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def null_text(self, batch: int) -> tuple[Tensor, Tensor]:
        """Learned null caption (B, 1, text_dim) and its all-True mask, for caption dropout and CFG."""
        mask = torch.ones(batch, 1, dtype=torch.bool, device=self.null_text_embed.device)
        return self.null_text_embed.expand(batch, -1, -1), mask

    def family(self, x: Tensor, modality: Tensor) -> LatentIO:
        """The batch's latent family, read from x's shape: audio latents are (B, audio_channels, T, 1, 1).

        Shapes are static under torch.compile, so this costs no host sync and no graph break; reading the
        modality ids did both, once per step. The ids decide only when both families fit the shape (equal
        channel counts, visual_patch 1, a 1x1 latent). They are checked against the shape where that is free:
        on CPU, outside compilation (the loader checks every batch it builds on the host).
        """
        audio = x.shape[1] == self.audio.channels and x.shape[-2:] == (1, 1)
        if audio and x.shape[1] == self.visual.channels and self.visual.patch == 1:
            audio = bool((modality == AUDIO).all())
        if modality.device.type == "cpu" and not torch.compiler.is_compiling():
            n_audio = int((modality == AUDIO).sum())
            if n_audio not in (0, modality.numel()):
                raise ValueError("a batch must not mix audio with image/video latents")
            if bool(n_audio) != audio:
                ids, shaped = ("audio", "image/video") if n_audio else ("image/video", "audio")
                raise ValueError(f"modality ids say {ids} but latents of shape {tuple(x.shape)} are {shaped}")
        return self.audio if audio else self.visual

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

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        text: Tensor,
        text_mask: Tensor,
        modality: Tensor,
        *,
        mask_ratio: float = 0.0,
        generator: torch.Generator | None = None,
        features: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor] | DiTOutput:
        """x (B, C, T, H, W), t (B,) in [0, 1], text (B, L, D_text), text_mask (B, L), modality (B,) -> v like x.

        With mask_ratio > 0 returns forward_masked's (v, keep_mask) instead; with features=True the whole
        DiTOutput including REPA projections. Going through forward keeps DDP/FSDP wrappers in the loop.
        """
        if features:
            return self.forward_output(x, t, text, text_mask, modality, mask_ratio=mask_ratio, generator=generator,
                                       features=True)
        if mask_ratio > 0:
            return self.forward_masked(x, t, text, text_mask, modality, mask_ratio=mask_ratio, generator=generator)
        return self.forward_output(x, t, text, text_mask, modality).velocity

    def forward_masked(
        self,
        x: Tensor,
        t: Tensor,
        text: Tensor,
        text_mask: Tensor,
        modality: Tensor,
        *,
        mask_ratio: float,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(v, keep_mask): the backbone sees a random (1 - mask_ratio) share of the tokens (in training only).

        v is zero at dropped patches; keep_mask is bool like x, so the loss is `mse(v[keep], target[keep])`.
        In eval mode every token is kept.
        """
        out = self.forward_output(x, t, text, text_mask, modality, mask_ratio=mask_ratio, generator=generator)
        keep_mask = torch.ones_like(x, dtype=torch.bool) if out.keep_mask is None else out.keep_mask
        return out.velocity, keep_mask

    def forward_with_features(
        self, x: Tensor, t: Tensor, text: Tensor, text_mask: Tensor, modality: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(v, features): REPA projections (B, N, repa_dim) of the hidden states after block repa_depth."""
        out = self.forward_output(x, t, text, text_mask, modality, features=True)
        return out.velocity, out.features

    def forward_output(
        self,
        x: Tensor,
        t: Tensor,
        text: Tensor,
        text_mask: Tensor,
        modality: Tensor,
        *,
        mask_ratio: float = 0.0,
        generator: torch.Generator | None = None,
        features: bool = False,
    ) -> DiTOutput:
        """The whole forward pass as a DiTOutput; forward, forward_masked and forward_with_features pick from it."""
        if features and self.repa_projector is None:
            raise ValueError("REPA features need repa_depth > 0 and repa_dim > 0 in DiTConfig")
        io = self.family(x, modality)
        grid = io.grid(x)
        ctx, ctx_mask, pooled = self.encode_text(text, text_mask)
        m = self.modality_embed(modality)
        c = self.t_embedder(t) + m + pooled
        h = io.embed(io.patchify(x)) + m.unsqueeze(1)
        rope = None
        if self.cfg.pos_embed == "sincos":
            h = h + sincos_3d(self.cfg.hidden, grid, h.device).to(h.dtype)
        else:
            rope = rope_tables(self.cfg.hidden // self.cfg.heads, grid, h.device)
        for block in self.mixer:
            h = self.run_block(block, h, c, ctx, ctx_mask, rope)
        keep = None
        if mask_ratio > 0 and self.training:  # deferred masking: the mixer has seen every token
            keep = random_keep(h.shape[0], h.shape[1], mask_ratio, generator, h.device)
            h = gather_tokens(h, keep)
            rope = None if rope is None else (gather_tokens(rope[0], keep), gather_tokens(rope[1], keep))
        feats = None
        for i, block in enumerate(self.blocks):
            h = self.run_block(block, h, c, ctx, ctx_mask, rope)
            if features and i + 1 == self.cfg.repa_depth:
                feats = self.repa_projector(h)
        out = io.final(h, c)
        if self.grad_all_families and self.training:
            other = self.visual if io is self.audio else self.audio
            out = out + sum(p.sum() for p in other.parameters()).to(out.dtype) * 0.0
        if keep is None:
            return DiTOutput(io.unpatchify(out, grid), None, None, feats)
        num_tokens = math.prod(grid)
        kept = scatter_tokens(torch.ones_like(out[..., :1], dtype=torch.bool), keep, num_tokens)
        feats = None if feats is None else scatter_tokens(feats, keep, num_tokens)
        velocity = io.unpatchify(scatter_tokens(out, keep, num_tokens), grid)
        return DiTOutput(velocity, io.unpatchify(kept.expand(-1, -1, out.shape[-1]), grid), kept[..., 0], feats)

    def run_block(
        self, block: DiTBlock, h: Tensor, c: Tensor, ctx: Tensor, ctx_mask: Tensor, rope: Rope | None
    ) -> Tensor:
        if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, c, ctx, ctx_mask, rope, use_reentrant=False)
        return block(h, c, ctx, ctx_mask, rope)

    def compile_blocks(self, **options: Any) -> DiT:
        """torch.compile each block in place (regional compilation, as torchtitan compiles transformer blocks).

        Every block has the same code, so the compiled graph is traced once and reused by all of them: a cold
        compile costs one block's trace and kernels, not the whole unrolled depth (DiT-XL's 28 blocks compiled as
        one graph ran past four minutes on an H100 before its first step). The embedders and final layer stay eager;
        they are a small share of the FLOPs. `Module.compile` keeps parameter names, so state dicts and checkpoints
        are the same as the eager model's, and FSDP/DDP wrap the blocks as before. `options` go to `torch.compile`.
        """
        for block in [*self.mixer, *self.blocks]:
            block.compile(**options)
        return self


def repa_projector(hidden: int, out_dim: int) -> nn.Sequential:
    """REPA's MLP (Yu et al. 2024) from DiT hidden states to the width of the target encoder's features."""
    width = 2 * hidden
    return nn.Sequential(
        nn.Linear(hidden, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, out_dim)
    )


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
