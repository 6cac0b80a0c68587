"""The embedded encoders (no weights) behind the LatentEncoder interface."""
from __future__ import annotations

import numpy as np

from latentforge.datasets.codec import DctAudioCodec, HaarPixelCodec
from latentforge.datasets.encoders.base import AudioEncoder, PixelEncoder, config_hash


class HaarEncoder(PixelEncoder):
    kind = "haar"
    channels = 12
    spatial_factor = 2
    spatial_multiple = 2

    def __init__(self):
        self.codec = HaarPixelCodec()

    def encode(self, frames: np.ndarray) -> np.ndarray:
        return np.stack([self.codec.encode(f) for f in frames])

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return np.stack([self.codec.decode(z) for z in latents])

    def describe(self) -> dict:
        return {"kind": self.kind, "model": None, "revision": None, "config_hash": config_hash({"kind": "haar"}),
                "channels": 12, "spatial_factor": 2, "temporal_factor": 1, "frame_rule": "any",
                "scale": 1.0, "shift": 0.0, "downsample": 2}


class DctFramesEncoder(AudioEncoder):
    kind = "dct_frames"

    def __init__(self, frame: int, sample_rate: int):
        self.codec = DctAudioCodec(frame=frame)
        self.channels = self.hop = frame
        self.sample_rate = sample_rate

    def encode(self, waves: np.ndarray) -> np.ndarray:
        return np.stack([self.codec.encode(w) for w in waves])

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return np.stack([self.codec.decode(z) for z in latents])

    def describe(self) -> dict:
        return {"kind": self.kind, "model": None, "revision": None,
                "config_hash": config_hash({"kind": self.kind, "frame": self.hop}), "channels": self.channels,
                "frame": self.hop, "hop": self.hop, "sample_rate": self.sample_rate, "scale": 1.0, "shift": 0.0}
