"""Pretrained diffusers VAEs behind the LatentEncoder interface, loaded by hub id or local directory.

Imported only when such an encoder is configured, so torch and diffusers load at module top.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import diffusers
import numpy as np
import torch

from latentforge.datasets.encoders.base import AudioEncoder, PixelEncoder, config_hash
from latentforge.datasets.encoders.config import AutoencoderKLConfig, OobleckConfig, PretrainedRef, VideoVAEConfig
from latentforge.datasets.encoders.devices import resolve_device, resolve_dtype

MAX_CHUNK_FRAMES = 16  # frames (or waveforms) per VAE call, to bound activation memory
VIDEO_VAE_CLASSES = {"ltx_video": "AutoencoderKLLTXVideo", "wan": "AutoencoderKLWan",
                     "cogvideox": "AutoencoderKLCogVideoX"}
WAN_CHUNK_FRAMES = 4  # diffusers' Wan encoder takes frame 0, then chunks of exactly 4 frames


@dataclass(frozen=True)
class LatentNorm:
    """stored = ((raw - mean_c) / std_c - shift) * scale; `mean`/`std` are per channel, or None for scalar only."""

    scale: float = 1.0
    shift: float = 0.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @classmethod
    def of(cls, scale=None, shift=None, mean=None, std=None) -> LatentNorm:
        per_channel = mean is not None and std is not None
        return cls(scale=float(1.0 if scale is None else scale), shift=float(shift or 0.0),
                   mean=tuple(float(v) for v in mean) if per_channel else None,
                   std=tuple(float(v) for v in std) if per_channel else None)

    def _channel(self, values: tuple[float, ...], z: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=z.dtype, device=z.device).view(1, -1, *[1] * (z.ndim - 2))

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        if self.mean is not None:
            z = (z - self._channel(self.mean, z)) / self._channel(self.std, z)
        return (z - self.shift) * self.scale

    def invert(self, z: torch.Tensor) -> torch.Tensor:
        z = z / self.scale + self.shift
        if self.mean is not None:
            z = z * self._channel(self.std, z) + self._channel(self.mean, z)
        return z

    def describe(self) -> dict:
        d = {"scale": self.scale, "shift": self.shift}
        if self.mean is not None:
            d.update(latents_mean=list(self.mean), latents_std=list(self.std))
        return d


class PretrainedVAE:
    """A diffusers VAE loaded on its device in its dtype, and the card fields it implies (shared below)."""

    def __init__(self, class_name: str, ref: PretrainedRef):
        self.ref = ref
        self.device = resolve_device(ref.device)
        self.dtype = resolve_dtype(ref.dtype, self.device)
        vae_class = getattr(diffusers, class_name)
        vae = vae_class.from_pretrained(ref.model, subfolder=ref.subfolder, revision=ref.revision,
                                        torch_dtype=self.dtype)
        self.model = vae.to(self.device).eval()
        self.config = vae.config

    def latent(self, dist) -> torch.Tensor:
        return (dist.mode() if self.ref.sample == "mode" else dist.sample()).float()

    def describe(self, kind: str, norm: LatentNorm) -> dict:
        """The card fields every pretrained encoder shares.

        The hash covers the model's config, ours and the normalisation (LTX keeps its mean/std in weights).
        Device and dtype stay out of it: the same weights give the same latent space on any hardware.
        """
        name = type(self.model).__name__
        model_config = {k: v for k, v in dict(self.config).items() if not k.startswith("_")}
        ours = self.ref.model_dump(exclude={"device", "dtype"})
        digest = config_hash({"class": name, "model": model_config, "encoder": ours, "norm": norm.describe()})
        return {"kind": kind, "model": self.ref.model, "subfolder": self.ref.subfolder,
                "revision": self.ref.revision, "class": name, "config_hash": digest,
                "dtype": str(self.dtype).removeprefix("torch."), "sample": self.ref.sample, **norm.describe()}


def frames_to_unit(frames: np.ndarray) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> float32 in [-1, 1], same layout."""
    return torch.from_numpy(np.ascontiguousarray(frames)).float().div_(127.5).sub_(1.0)


def unit_to_frames(x: torch.Tensor) -> np.ndarray:
    """float in [-1, 1] (any layout) -> uint8 of the same layout."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 5 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected (B, T, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    return frames


def check_latents(latents: np.ndarray, channels: int, ndim: int = 5) -> np.ndarray:
    latents = np.asarray(latents, dtype=np.float32)
    if latents.ndim != ndim or latents.shape[1] != channels:
        raise ValueError(f"expected {ndim}-D latents with {channels} channels at axis 1, got {latents.shape}")
    return latents


class AutoencoderKLEncoder(PixelEncoder):
    """An image VAE (SD / SDXL / FLUX style); a video is encoded frame by frame, so any frame count works."""

    kind = "autoencoder_kl"

    def __init__(self, cfg: AutoencoderKLConfig):
        self.cfg = cfg
        self.vae = PretrainedVAE("AutoencoderKL", cfg)
        c = self.vae.config
        if cfg.tiling:
            self.vae.model.enable_tiling()
        if cfg.slicing:
            self.vae.model.enable_slicing()
        self.channels = int(c.latent_channels)
        self.spatial_factor = self.spatial_multiple = 2 ** (len(c.block_out_channels) - 1)
        self.norm = LatentNorm.of(c.scaling_factor, c.shift_factor, c.get("latents_mean"), c.get("latents_std"))
        self.scale, self.shift = self.norm.scale, self.norm.shift

    @torch.inference_mode()
    def encode(self, frames: np.ndarray) -> np.ndarray:
        frames = check_frames(frames)
        b, t, h, w, _ = frames.shape
        self.check_size(h, w, t)
        flat = frames.reshape(b * t, h, w, 3)
        parts = []
        for i in range(0, b * t, MAX_CHUNK_FRAMES):
            x = frames_to_unit(flat[i:i + MAX_CHUNK_FRAMES]).permute(0, 3, 1, 2)
            z = self.vae.latent(self.vae.model.encode(x.to(self.vae.device, self.vae.dtype)).latent_dist)
            parts.append(self.norm.apply(z).cpu().numpy())
        z = np.concatenate(parts)  # (B*T, C, h, w)
        return np.ascontiguousarray(z.reshape(b, t, *z.shape[1:]).transpose(0, 2, 1, 3, 4), dtype=np.float32)

    @torch.inference_mode()
    def decode(self, latents: np.ndarray) -> np.ndarray:
        b, c, t, h, w = check_latents(latents, self.channels).shape
        flat = np.ascontiguousarray(latents.transpose(0, 2, 1, 3, 4).reshape(b * t, c, h, w), dtype=np.float32)
        parts = []
        for i in range(0, b * t, MAX_CHUNK_FRAMES):
            z = self.norm.invert(torch.from_numpy(flat[i:i + MAX_CHUNK_FRAMES]).to(self.vae.device))
            x = self.vae.model.decode(z.to(self.vae.dtype)).sample
            parts.append(unit_to_frames(x.permute(0, 2, 3, 1)))
        out = np.concatenate(parts)
        return out.reshape(b, t, *out.shape[1:])

    def describe(self) -> dict:
        return {**self.vae.describe(self.kind, self.norm), "channels": self.channels,
                "spatial_factor": self.spatial_factor, "temporal_factor": 1, "frame_rule": "any",
                "tiling": self.cfg.tiling}


def video_geometry(kind: str, vae) -> tuple[int, int, int]:
    """(spatial factor, temporal factor, frame step) of a loaded video VAE, from its own config.

    The frame step is what the frame count minus one must be a multiple of: the temporal factor for LTX;
    4 for Wan (its encoder's fixed chunk); twice the temporal factor for CogVideoX, whose decoder only returns
    the input's frame count for an odd number of latent frames (5 frames -> 2 latents -> 8 frames).
    """
    c = vae.config
    if kind == "ltx_video":
        t = int(vae.temporal_compression_ratio)
        return int(vae.spatial_compression_ratio), t, t
    if kind == "wan":
        down = len(c.dim_mult) - 1  # the last block never downsamples
        t = 2 ** sum(bool(d) for d in c.temperal_downsample[:down])
        if WAN_CHUNK_FRAMES % t:
            raise ValueError(f"wan: temporal factor {t} does not divide the encoder's {WAN_CHUNK_FRAMES}-frame chunk")
        return 2 ** down * (c.patch_size or 1), t, WAN_CHUNK_FRAMES
    if kind == "cogvideox":
        down = len(c.block_out_channels) - 1
        t = 2 ** min(int(math.log2(c.temporal_compression_ratio)), down)
        return 2 ** down, t, 2 * t if t > 1 else 1
    raise ValueError(f"unknown video VAE kind {kind!r}")


def video_norm(kind: str, vae) -> LatentNorm:
    """Each family's own latent convention, as its diffusers pipeline applies it."""
    c = vae.config
    if kind == "ltx_video":  # (z - mean) * scaling_factor / std, mean/std are buffers
        return LatentNorm.of(c.scaling_factor, 0.0, vae.latents_mean.tolist(), vae.latents_std.tolist())
    if kind == "wan":  # (z - mean) / std from the config
        return LatentNorm.of(1.0, 0.0, c.latents_mean, c.latents_std)
    return LatentNorm.of(c.scaling_factor, c.shift_factor)  # cogvideox: z * scaling_factor


class VideoVAEEncoder(PixelEncoder):
    """A causal video VAE (LTX-Video, Wan, CogVideoX): T frames -> (T - 1) / temporal_factor + 1 latent frames.

    A single image (T=1) gives one latent frame. Frame counts must be step*n+1 (see `video_geometry`).
    """

    def __init__(self, cfg: VideoVAEConfig):
        self.cfg = cfg
        self.kind = cfg.kind
        self.vae = PretrainedVAE(VIDEO_VAE_CLASSES[cfg.kind], cfg)
        if cfg.tiling:
            self.vae.model.enable_tiling()
        self.spatial_factor, self.temporal_factor, step = video_geometry(cfg.kind, self.vae.model)
        self.spatial_multiple = self.spatial_factor
        self.frame_rule = "any" if step == 1 else f"{step}n+1"
        self.channels = int(self.vae.config.get("latent_channels") or self.vae.config.get("z_dim"))
        self.norm = video_norm(cfg.kind, self.vae.model)
        self.scale, self.shift = self.norm.scale, self.norm.shift

    def _videos_per_call(self, frames: int) -> int:
        return max(1, MAX_CHUNK_FRAMES // frames)

    @torch.inference_mode()
    def encode(self, frames: np.ndarray) -> np.ndarray:
        frames = check_frames(frames)
        b, t, h, w, _ = frames.shape
        self.check_size(h, w, t)
        n = self._videos_per_call(t)
        parts = []
        for i in range(0, b, n):
            x = frames_to_unit(frames[i:i + n]).permute(0, 4, 1, 2, 3)  # (b, 3, T, H, W)
            z = self.vae.latent(self.vae.model.encode(x.to(self.vae.device, self.vae.dtype)).latent_dist)
            parts.append(self.norm.apply(z).cpu().numpy())
        return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)

    @torch.inference_mode()
    def decode(self, latents: np.ndarray) -> np.ndarray:
        b, _, t, _, _ = check_latents(latents, self.channels).shape
        n = self._videos_per_call((t - 1) * self.temporal_factor + 1)
        parts = []
        for i in range(0, b, n):
            z = self.norm.invert(torch.from_numpy(latents[i:i + n]).to(self.vae.device)).to(self.vae.dtype)
            kwargs = {}
            if self.kind == "ltx_video" and self.vae.config.timestep_conditioning:
                kwargs["temb"] = torch.zeros(len(z), device=z.device, dtype=z.dtype)  # decode_timestep=0
            x = self.vae.model.decode(z, **kwargs).sample
            parts.append(unit_to_frames(x.permute(0, 2, 3, 4, 1)))
        return np.concatenate(parts)

    def describe(self) -> dict:
        return {**self.vae.describe(self.kind, self.norm), "channels": self.channels,
                "spatial_factor": self.spatial_factor, "temporal_factor": self.temporal_factor,
                "frame_rule": self.frame_rule, "tiling": self.cfg.tiling}


class OobleckEncoder(AudioEncoder):
    """Stable Audio's Oobleck waveform VAE; mono in and out (repeated to / averaged from the model's channels).

    Waveforms must already be at `sample_rate` (the model's own) and a multiple of `hop` samples long.
    """

    kind = "oobleck"

    def __init__(self, cfg: OobleckConfig):
        self.cfg = cfg
        self.vae = PretrainedVAE("AutoencoderOobleck", cfg)
        c = self.vae.config
        self.sample_rate = int(c.sampling_rate)
        self.hop = int(np.prod(c.downsampling_ratios))
        self.channels = int(c.decoder_input_channels)
        self.audio_channels = int(c.audio_channels)
        self.norm = LatentNorm()

    @torch.inference_mode()
    def encode(self, waves: np.ndarray) -> np.ndarray:
        waves = np.asarray(waves, dtype=np.float32)
        if waves.ndim != 2 or waves.shape[1] % self.hop:
            raise ValueError(f"oobleck: expected (B, N) waves with N a multiple of {self.hop}, got {waves.shape}")
        parts = []
        for i in range(0, len(waves), MAX_CHUNK_FRAMES):
            x = torch.from_numpy(waves[i:i + MAX_CHUNK_FRAMES]).to(self.vae.device, self.vae.dtype)
            x = x[:, None, :].expand(-1, self.audio_channels, -1)
            parts.append(self.vae.latent(self.vae.model.encode(x).latent_dist).cpu().numpy())
        return np.ascontiguousarray(np.concatenate(parts)[..., None, None], dtype=np.float32)

    @torch.inference_mode()
    def decode(self, latents: np.ndarray) -> np.ndarray:
        latents = check_latents(latents, self.channels)[..., 0, 0]
        parts = []
        for i in range(0, len(latents), MAX_CHUNK_FRAMES):
            z = torch.from_numpy(np.ascontiguousarray(latents[i:i + MAX_CHUNK_FRAMES]))
            x = self.vae.model.decode(z.to(self.vae.device, self.vae.dtype)).sample  # (b, channels, N)
            parts.append(x.float().mean(dim=1).cpu().numpy())
        return np.concatenate(parts).astype(np.float32)

    def describe(self) -> dict:
        return {**self.vae.describe(self.kind, self.norm), "channels": self.channels,
                "sample_rate": self.sample_rate, "hop": self.hop, "audio_channels": self.audio_channels}
