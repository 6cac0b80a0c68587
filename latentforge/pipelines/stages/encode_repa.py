"""REPA target features (Yu et al. 2024): DINOv2 patch tokens, one feature row per DiT token of the latent.

The rule, for a visual latent (C, T, H, W), a DiT with patches (pt, p, p) (`curation.encoders.repa.patch` and
`temporal_patch`; latentforge's DiT has pt = 1):

    N = (T // pt) * (H // p) * (W // p),   rows in the DiT's token order (t, h, w), t slowest

- Key frames: one pixel frame per temporal token, the frame at the centre of its time span (the decoders'
  "centres of equal segments" rule with T // pt segments). For the Haar codec and image VAEs a latent frame is
  a pixel frame, so these are the very frames the latents came from; for causal video VAEs (4x temporal
  compression) they are the frames nearest the centre of each latent frame's span.
- Spatial grid: each key frame is decoded with the same aspect-preserving resize + centre crop as the latents,
  at (H // p * q, W // p * q) px where q is the encoder's patch size (14 for DINOv2), so the encoder's patch
  grid *is* the DiT's token grid (REPA's own recipe: 256 px images, 16 x 16 DiT tokens, DINOv2 at 224 px).
  When that input would exceed `max_input_side`, the frame is encoded at the largest grid that fits and the
  patch tokens are bilinearly resized up to (H // p, W // p).
- Features: the encoder's last hidden state without the CLS and register tokens, stored float16 (N, D) as the
  shard member `repa.npy`. Audio samples get none (no REPA target for audio latents).
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from latentforge.datasets import media, video
from latentforge.datasets.encoders.devices import resolve_device, resolve_dtype
from latentforge.datasets.shards import npy_bytes
from latentforge.datasets.video import decode_clip
from latentforge.pipelines.resources import StageResources
from latentforge.pipelines.stage import Reject, Stage
from latentforge.pipelines.stages.encode_latents import parse_shape

if TYPE_CHECKING:
    from latentforge.datasets.encoders.config import RepaEncoderConfig
    from latentforge.pipelines.config import CurationConfig

TOKENS_RULE = ("N = (T // pt) * (H // p) * (W // p) for a (C, T, H, W) latent, rows in (t, h, w) order; "
               "key frame = centre of each temporal token's span; encoder input (H // p * q, W // p * q) px, "
               "q = encoder patch; patch tokens without CLS/registers, bilinearly resized when capped")


def token_grid(latent_shape, patch: int, temporal_patch: int) -> tuple[int, int, int]:
    """(T // pt, H // p, W // p): the DiT's token grid of a (C, T, H, W) latent."""
    _, t, h, w = parse_shape(latent_shape)
    grid = (t // temporal_patch, h // patch, w // patch)
    if min(grid) < 1:
        raise ValueError(f"latent {parse_shape(latent_shape)} has no whole (pt={temporal_patch}, p={patch}) token")
    return grid


def input_grid(grid_hw: tuple[int, int], max_cells: int) -> tuple[int, int]:
    """The encoder's patch grid: the token grid itself, or scaled down (aspect kept) to `max_cells` per side."""
    h, w = grid_hw
    scale = min(1.0, max_cells / max(h, w))
    return max(1, math.floor(h * scale)), max(1, math.floor(w * scale))


class RepaFeatures:
    """A DINOv2-class encoder loaded with transformers (hub id or local directory), returning token features."""

    def __init__(self, cfg: RepaEncoderConfig):
        import torch
        from transformers import AutoImageProcessor, AutoModel

        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        kwargs = {"revision": cfg.revision, **({"subfolder": cfg.subfolder} if cfg.subfolder else {})}
        self.processor = AutoImageProcessor.from_pretrained(cfg.model, **kwargs)
        self.model = AutoModel.from_pretrained(cfg.model, dtype=self.dtype, **kwargs).to(self.device).eval()
        config = self.model.config
        self.encoder_patch = int(config.patch_size)
        self.dim = int(config.hidden_size)
        self.skip = 1 + int(getattr(config, "num_register_tokens", 0) or 0)  # CLS, then registers
        self.revision = getattr(config, "_commit_hash", None) or cfg.revision
        self._torch = torch

    def describe(self) -> dict:
        return {"kind": self.cfg.kind, "model": self.cfg.model, "revision": self.revision, "dim": self.dim,
                "patch": self.cfg.patch, "temporal_patch": self.cfg.temporal_patch, "tokens_rule": TOKENS_RULE}

    def input_size(self, grid_hw: tuple[int, int]) -> tuple[int, int]:
        gh, gw = input_grid(grid_hw, self.cfg.max_input_side // self.encoder_patch)
        return gh * self.encoder_patch, gw * self.encoder_patch

    def __call__(self, frames: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
        """uint8 (T, h, w, 3) frames at `input_size(grid_hw)` -> float16 (T * gh * gw, D)."""
        torch = self._torch
        # The processor only normalises: frames are already resized and cropped like the latents.
        pixels = self.processor(images=list(frames), do_resize=False, do_center_crop=False,
                                return_tensors="pt")["pixel_values"]
        gh, gw = frames.shape[1] // self.encoder_patch, frames.shape[2] // self.encoder_patch
        out = []
        with torch.inference_mode():
            for chunk in pixels.split(self.cfg.batch_size):
                hidden = self.model(pixel_values=chunk.to(self.device, self.dtype)).last_hidden_state
                tokens = hidden[:, self.skip:].float().reshape(len(chunk), gh, gw, -1)
                if (gh, gw) != tuple(grid_hw):
                    tokens = torch.nn.functional.interpolate(tokens.permute(0, 3, 1, 2), size=tuple(grid_hw),
                                                             mode="bilinear", align_corners=False)
                    tokens = tokens.permute(0, 2, 3, 1)
                out.append(tokens.reshape(len(chunk), -1, tokens.shape[-1]).cpu())
        return torch.cat(out).reshape(-1, self.dim).numpy().astype(np.float16)


class EncodeRepa(Stage):
    """REPA features per visual sample after EncodeLatents (it needs the latent shape); off unless configured."""

    name = "encode_repa"
    resources = StageResources(num_cpus=0.5, batch_size=8, pool=1)
    outputs = {"repa": b"", "repa_encoder": ""}

    @classmethod
    def enabled(cls, cfg: CurationConfig) -> bool:
        return cfg.encoders.repa is not None

    def __init__(self, cfg: CurationConfig):
        super().__init__(cfg)
        self.features = RepaFeatures(cfg.encoders.repa)
        self.description = json.dumps(self.features.describe(), sort_keys=True)

    def process_row(self, row: dict) -> dict:
        if row["modality"] not in ("image", "video"):
            return {}
        rcfg = self.cfg.encoders.repa
        t, h, w = token_grid(row["latent_shape"], rcfg.patch, rcfg.temporal_patch)
        frames = self.key_frames(row, t, self.features.input_size((h, w)))
        return {"repa": npy_bytes(self.features(frames, (h, w))), "repa_encoder": self.description}

    def key_frames(self, row: dict, count: int, size: tuple[int, int]) -> np.ndarray:
        """`count` frames at the centres of equal spans of the sample, resized and cropped like its latents."""
        try:
            if row["modality"] == "image":
                return media.decode_image(row["uri"], size)[None]
            if int(row.get("clip_index", -1)) >= 0:
                return decode_clip(row["uri"], float(row["clip_start_s"]), float(row["clip_end_s"]), count, size,
                                   self.cfg.decode_timeout_s)[0]
            return video.decode_video(row["uri"], count, size, timeout_s=self.cfg.decode_timeout_s)[0]
        except media.MediaError as e:
            raise Reject(e.reason, f"repa: {e}") from e


def repa_description(described: Iterable[str | None]) -> dict | None:
    """What the REPA stage said about its encoder (all actors must agree: `described`, the kept rows'
    `repa_encoder` values, distinct or not), or None when it did not run."""
    found = {v for v in described if v}
    if len(found) > 1:
        raise RuntimeError(f"repa encoder differs between actors: {sorted(found)}")
    return json.loads(found.pop()) if found else None
