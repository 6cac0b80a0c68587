"""What every latent encoder is: numpy batches in, (B, C, T, H, W) float32 latents out, and back."""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class LatentEncoder(ABC):
    """Base of visual and audio latent encoders.

    Stored latents are `(raw - shift) * scale` (the diffusers convention), so a decoder needs the card only.
    """

    family: ClassVar[str]  # "visual" | "audio"
    kind: ClassVar[str]
    channels: int
    scale: float = 1.0
    shift: float = 0.0

    @abstractmethod
    def describe(self) -> dict:
        """What the dataset card records: kind, model, revision, config_hash, channels, factors, scale/shift."""

    def identity(self) -> dict:
        """The fields that must match for two datasets' latents to be mixed in one training stage."""
        d = self.describe()
        return {k: d.get(k) for k in ("kind", "model", "revision", "config_hash", "channels", "scale", "shift")}


class PixelEncoder(LatentEncoder):
    """(B, T, H, W, 3) uint8 frames <-> (B, C, T', H', W') float32 latents."""

    family = "visual"
    spatial_factor: int = 1  # H' = H / spatial_factor
    temporal_factor: int = 1  # T' = (T - 1) / temporal_factor + 1 for causal video VAEs, else T
    spatial_multiple: int = 1  # H and W must be multiples of this
    frame_rule: str = "any"  # "any" or "kn+1"

    @abstractmethod
    def encode(self, frames: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def decode(self, latents: np.ndarray) -> np.ndarray: ...

    def valid_frames(self, n: int) -> int:
        """The largest frame count <= n this encoder accepts (>= 1)."""
        if self.frame_rule == "any" or n <= 1:
            return max(1, n)
        k = int(self.frame_rule.split("n")[0])
        return (n - 1) // k * k + 1

    def check_size(self, height: int, width: int, frames: int) -> None:
        m = self.spatial_multiple
        if height % m or width % m:
            raise ValueError(f"{self.kind}: frame size {height}x{width} must be a multiple of {m}")
        if self.valid_frames(frames) != frames:
            raise ValueError(f"{self.kind}: {frames} frames break the frame rule {self.frame_rule}")

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        t = frames if self.temporal_factor == 1 else (frames - 1) // self.temporal_factor + 1
        return self.channels, t, height // self.spatial_factor, width // self.spatial_factor


class AudioEncoder(LatentEncoder):
    """(B, N) float32 mono waveforms <-> (B, C, T', 1, 1) float32 latents."""

    family = "audio"
    sample_rate: int
    hop: int = 1  # waveform samples per latent step; N must be a multiple

    @abstractmethod
    def encode(self, waves: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def decode(self, latents: np.ndarray) -> np.ndarray: ...

    def valid_samples(self, n: int) -> int:
        return max(self.hop, n - n % self.hop)
