"""Log-mel spectrogram latents, decoded back to sound with a mel pseudo-inverse and Griffin-Lim."""
from __future__ import annotations

import numpy as np
import torch

from latentforge.datasets.encoders.base import AudioEncoder, config_hash
from latentforge.datasets.encoders.config import LogMelConfig

LOG_FLOOR = 1e-5
GRIFFIN_LIM_ITERS = 32
GRIFFIN_LIM_MOMENTUM = 0.99  # "fast Griffin-Lim" (Perraudin et al. 2013), as torchaudio uses


def hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular filters on the HTK mel scale, 0 Hz to Nyquist, each peaking at 1.

    HTK scale (mel = 2595 log10(1 + f / 700)) with unnormalised triangles, not Slaney's area normalisation:
    the pseudo-inverse in `decode` undoes the filter gains either way, and peak-1 filters keep the log values
    in a range that does not depend on n_mels.
    """
    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(0.0, hz_to_mel(sample_rate / 2), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None] - lower) / (centre - lower)
    falling = (upper - freqs[None]) / (upper - centre)
    return np.clip(np.minimum(rising, falling), 0.0, None).astype(np.float32)


class LogMelEncoder(AudioEncoder):
    """(B, N) waves -> (B, n_mels, N / hop, 1, 1) latents of log(mel(|STFT|) + 1e-5).

    Not exactly invertible: `decode` drops the phase and the detail the mel filters average away, recovers a
    magnitude spectrogram with the filterbank's pseudo-inverse and estimates a phase with Griffin-Lim. The pitch
    and loudness of the sound survive; the waveform does not.
    """

    kind = "log_mel"

    def __init__(self, cfg: LogMelConfig, sample_rate: int):
        if cfg.hop > cfg.n_fft // 2:
            raise ValueError(f"log_mel: hop {cfg.hop} must be at most n_fft / 2 ({cfg.n_fft // 2})")
        self.cfg = cfg
        self.sample_rate = int(sample_rate)
        self.hop = cfg.hop
        self.channels = cfg.n_mels
        self.filters = torch.from_numpy(mel_filterbank(self.sample_rate, cfg.n_fft, cfg.n_mels))
        self.inverse = torch.from_numpy(np.linalg.pinv(self.filters.numpy().astype(np.float64)).astype(np.float32))
        self.window = torch.hann_window(cfg.n_fft)

    def _stft(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N) -> (B, F, N / hop) complex; the centred STFT's last frame (past the end) is dropped."""
        n = x.shape[-1] // self.hop
        spec = torch.stft(x, self.cfg.n_fft, self.hop, window=self.window, center=True, return_complex=True)
        return spec[..., :n]

    def _istft(self, spec: torch.Tensor, length: int) -> torch.Tensor:
        return torch.istft(spec, self.cfg.n_fft, self.hop, window=self.window, center=True, length=length)

    @torch.inference_mode()
    def encode(self, waves: np.ndarray) -> np.ndarray:
        waves = np.asarray(waves, dtype=np.float32)
        if waves.ndim != 2 or waves.shape[1] % self.hop or waves.shape[1] < self.hop:
            raise ValueError(f"log_mel: expected (B, N) waves with N a positive multiple of {self.hop}, "
                             f"got {waves.shape}")
        magnitude = self._stft(torch.from_numpy(waves)).abs()
        mel = torch.log(torch.matmul(self.filters, magnitude) + LOG_FLOOR)
        return mel.numpy()[..., None, None].astype(np.float32)

    @torch.inference_mode()
    def decode(self, latents: np.ndarray) -> np.ndarray:
        mel = np.asarray(latents, dtype=np.float32)
        if mel.ndim != 5 or mel.shape[1] != self.channels:
            raise ValueError(f"log_mel: expected (B, {self.channels}, T, 1, 1) latents, got {mel.shape}")
        mel = (torch.from_numpy(mel[..., 0, 0]).exp() - LOG_FLOOR).clamp_(min=0.0)
        magnitude = torch.matmul(self.inverse, mel).clamp_(min=0.0)  # (B, F, T)
        return self.griffin_lim(magnitude, mel.shape[-1] * self.hop).numpy().astype(np.float32)

    def griffin_lim(self, magnitude: torch.Tensor, length: int) -> torch.Tensor:
        """A waveform whose STFT magnitude approximates `magnitude` (phase from a fixed seed, so deterministic)."""
        g = torch.Generator().manual_seed(0)
        phase = torch.exp(2j * torch.pi * torch.rand(magnitude.shape, generator=g))
        previous = torch.zeros_like(phase)
        for _ in range(GRIFFIN_LIM_ITERS):
            wave = self._istft(magnitude * phase, length)
            rebuilt = self._stft(wave)
            accelerated = rebuilt - GRIFFIN_LIM_MOMENTUM / (1 + GRIFFIN_LIM_MOMENTUM) * previous
            previous = rebuilt
            phase = accelerated / accelerated.abs().clamp(min=1e-8)
        return self._istft(magnitude * phase, length)

    def describe(self) -> dict:
        params = {"kind": self.kind, "n_fft": self.cfg.n_fft, "hop": self.hop, "n_mels": self.channels,
                  "sample_rate": self.sample_rate, "mel_scale": "htk", "log_floor": LOG_FLOOR}
        return {**params, "model": None, "revision": None, "config_hash": config_hash(params),
                "channels": self.channels, "scale": 1.0, "shift": 0.0, "dtype": "float32"}
