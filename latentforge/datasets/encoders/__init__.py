"""Latent encoders (visual, audio) and text encoders, built from their configs by `kind`.

Pretrained implementations import torch / diffusers / transformers only when configured.
"""
from __future__ import annotations

from latentforge.datasets.encoders.base import AudioEncoder, LatentEncoder, PixelEncoder
from latentforge.datasets.encoders.config import (
    AudioEncoderConfig,
    EncodersConfig,
    TextEncoderConfig,
    VisualEncoderConfig,
)


def build_visual_encoder(cfg: VisualEncoderConfig) -> PixelEncoder:
    if cfg.kind == "haar":
        from latentforge.datasets.encoders.embedded import HaarEncoder

        return HaarEncoder()
    from latentforge.datasets.encoders import pretrained

    if cfg.kind == "autoencoder_kl":
        return pretrained.AutoencoderKLEncoder(cfg)
    return pretrained.VideoVAEEncoder(cfg)


def build_audio_encoder(cfg: AudioEncoderConfig, sample_rate: int) -> AudioEncoder:
    """`sample_rate` applies to encoders that have none of their own (a pretrained VAE brings its rate)."""
    if cfg.kind == "dct_frames":
        from latentforge.datasets.encoders.embedded import DctFramesEncoder

        return DctFramesEncoder(cfg.frame, sample_rate)
    if cfg.kind == "log_mel":
        from latentforge.datasets.encoders.log_mel import LogMelEncoder

        return LogMelEncoder(cfg, sample_rate)
    from latentforge.datasets.encoders.pretrained import OobleckEncoder

    return OobleckEncoder(cfg)


def build_text_encoder(cfg: TextEncoderConfig):
    from latentforge.datasets.encoders.text import TextEncoder

    return TextEncoder(cfg)


def decoders_from_card(card: dict) -> tuple[PixelEncoder, AudioEncoder]:
    """The visual and audio encoders a dataset was made with, rebuilt from its card (to decode samples)."""
    cfg = EncodersConfig.model_validate(card["config"]["encoders"])
    return build_visual_encoder(cfg.visual), build_audio_encoder(cfg.audio, card["encoders"]["audio"]["sample_rate"])


__all__ = ["AudioEncoder", "EncodersConfig", "LatentEncoder", "PixelEncoder", "build_audio_encoder",
           "decoders_from_card", "build_text_encoder", "build_visual_encoder"]
