"""Exactly invertible latent codecs that need no downloaded weights.

They stand in for a pretrained VAE in the quickstart and the tests: the latent keeps every bit of the input
(encode then decode returns it), so what a DiT learns on them can be looked at as pixels and sound.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

_SQRT_HALF = np.float32(np.sqrt(0.5))


def _haar_rows(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """One orthonormal Haar step along `axis`: (low, high) halves."""
    even = np.take(x, np.arange(0, x.shape[axis], 2), axis=axis)
    odd = np.take(x, np.arange(1, x.shape[axis], 2), axis=axis)
    return (even + odd) * _SQRT_HALF, (even - odd) * _SQRT_HALF


def _unhaar_rows(low: np.ndarray, high: np.ndarray, axis: int) -> np.ndarray:
    even = (low + high) * _SQRT_HALF
    odd = (low - high) * _SQRT_HALF
    out_shape = list(low.shape)
    out_shape[axis] *= 2
    out = np.empty(out_shape, dtype=np.float32)
    index = [slice(None)] * low.ndim
    index[axis] = slice(0, None, 2)
    out[tuple(index)] = even
    index[axis] = slice(1, None, 2)
    out[tuple(index)] = odd
    return out


@dataclass(frozen=True)
class HaarPixelCodec:
    """Pixels (T, H, W, 3) uint8 <-> latents (12, T, H/2, W/2) float32: a one-level 2D Haar transform.

    Space-to-depth by 2 with an orthonormal basis, so the latent has the per-channel layout of a VAE latent
    (low-pass RGB first, then three detail bands) and decoding is exact.
    """

    kind: str = "haar"
    channels: int = 12
    downsample: int = 2

    def encode(self, frames: np.ndarray) -> np.ndarray:
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected frames (T, H, W, 3), got {frames.shape}")
        if frames.shape[1] % 2 or frames.shape[2] % 2:
            raise ValueError(f"frame size {frames.shape[1:3]} must be even")
        x = frames.astype(np.float32) / 127.5 - 1.0  # [-1, 1]
        x = np.moveaxis(x, -1, 0)  # (3, T, H, W)
        low_h, high_h = _haar_rows(x, axis=2)
        ll, lh = _haar_rows(low_h, axis=3)
        hl, hh = _haar_rows(high_h, axis=3)
        return np.concatenate([ll, lh, hl, hh], axis=0).astype(np.float32)

    def decode_float(self, latent: np.ndarray) -> np.ndarray:
        """Latent -> float pixels in [-1, 1] of layout (T, H, W, 3), no rounding."""
        ll, lh, hl, hh = np.split(np.asarray(latent, dtype=np.float32), 4, axis=0)
        low_h = _unhaar_rows(ll, lh, axis=3)
        high_h = _unhaar_rows(hl, hh, axis=3)
        return np.moveaxis(_unhaar_rows(low_h, high_h, axis=2), 0, -1)

    def decode(self, latent: np.ndarray) -> np.ndarray:
        x = self.decode_float(latent)
        return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


@lru_cache(maxsize=8)
def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II basis (n, n): its transpose is its inverse."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (i + 0.5) * k / n) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m.astype(np.float64)


@dataclass(frozen=True)
class DctAudioCodec:
    """Mono waveform (N,) float32 <-> latents (frame, N/frame, 1, 1): an orthonormal DCT of each frame.

    A framed transform (no overlap), so each latent time step is one frame's spectrum; exactly invertible.
    """

    kind: str = "dct_frames"
    frame: int = 64

    @property
    def channels(self) -> int:
        return self.frame

    def encode(self, wave: np.ndarray) -> np.ndarray:
        wave = np.asarray(wave, dtype=np.float64)
        if wave.ndim != 1 or wave.size % self.frame:
            raise ValueError(f"waveform length {wave.shape} must be 1-D and a multiple of {self.frame}")
        frames = wave.reshape(-1, self.frame)  # (T, frame)
        spectra = frames @ _dct_matrix(self.frame).T  # (T, frame)
        return spectra.T[:, :, None, None].astype(np.float32)

    def decode(self, latent: np.ndarray) -> np.ndarray:
        spectra = np.asarray(latent, dtype=np.float64)[:, :, 0, 0].T  # (T, frame)
        return (spectra @ _dct_matrix(self.frame)).reshape(-1).astype(np.float32)
