"""Typed configs of the latent and text encoders; `kind` picks the implementation."""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PretrainedRef(Strict):
    """Where pretrained weights come from: a hub id or a local directory, as `from_pretrained` takes them."""

    model: str = Field(description="hub id or local directory")
    subfolder: str | None = Field(None, description="e.g. 'vae' inside a pipeline repository")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on GPU, float32 on CPU")
    device: Literal["auto", "cpu", "cuda"] = "auto"


class HaarConfig(Strict):
    """The embedded, exactly invertible Haar pixel codec (12 channels, /2 spatially). Needs no weights."""

    kind: Literal["haar"] = "haar"


class AutoencoderKLConfig(PretrainedRef):
    """diffusers AutoencoderKL (SD / SDXL / FLUX-style); videos are encoded frame by frame."""

    kind: Literal["autoencoder_kl"]
    tiling: bool = Field(False, description="tiled encode/decode for large frames")
    slicing: bool = Field(True, description="encode a batch one sample at a time inside the VAE")
    sample: Literal["mode", "sample"] = Field("mode", description="posterior mode (deterministic) or a sample")


class VideoVAEConfig(PretrainedRef):
    """diffusers causal video VAEs; each enforces its frame-count rule and spatial multiple."""

    kind: Literal["ltx_video", "wan", "cogvideox"]
    tiling: bool = False
    sample: Literal["mode", "sample"] = "mode"


VisualEncoderConfig = Annotated[Union[HaarConfig, AutoencoderKLConfig, VideoVAEConfig], Field(discriminator="kind")]


class DctFramesConfig(Strict):
    """The embedded, exactly invertible framed-DCT audio codec."""

    kind: Literal["dct_frames"] = "dct_frames"
    frame: int = Field(64, ge=8, description="samples per frame = latent channels")


class OobleckConfig(PretrainedRef):
    """diffusers AutoencoderOobleck (Stable Audio) on waveforms."""

    kind: Literal["oobleck"]
    sample: Literal["mode", "sample"] = "mode"


class LogMelConfig(Strict):
    """Log-mel spectrogram latents (C = n_mels), decoded back to sound with Griffin-Lim."""

    kind: Literal["log_mel"]
    n_fft: int = Field(512, ge=16)
    hop: int = Field(128, ge=1)
    n_mels: int = Field(64, ge=4)


AudioEncoderConfig = Annotated[Union[DctFramesConfig, OobleckConfig, LogMelConfig], Field(discriminator="kind")]


class TextEncoderConfig(Strict):
    """Text encoder producing padded token embeddings plus a mask."""

    kind: Literal["minilm", "t5", "clip"] = "minilm"
    model: str | None = Field(None, description="hub id or local dir; None = the MiniLM packaged on PyPI")
    subfolder: str | None = None
    revision: str | None = None
    max_len: int = Field(32, ge=4, le=512, description="tokens kept per caption (padded to this length)")
    batch_size: int = Field(32, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class RepaEncoderConfig(PretrainedRef):
    """REPA target features from a DINOv2-class vision encoder (transformers AutoModel + AutoImageProcessor).

    One feature row per DiT token: N = (T / temporal_patch) * (H / patch) * (W / patch) for a (C, T, H, W)
    latent (see latentforge.pipelines.stages.encode_repa for the rule and the key frames).
    """

    kind: Literal["dinov2"] = "dinov2"
    patch: int = Field(2, ge=1, description="the DiT's spatial patch p (model.visual_patch)")
    temporal_patch: int = Field(1, ge=1, description="the DiT's temporal patch pt (1 for latentforge's DiT)")
    max_input_side: int = Field(1036, ge=14, description=(
        "longest encoder input side (px); a larger token grid is encoded smaller and resized up to it"))
    batch_size: int = Field(16, ge=1, description="frames per encoder forward pass")


class EncodersConfig(Strict):
    """One latent encoder per family (images and videos share the visual one) and the text encoder."""

    visual: VisualEncoderConfig = HaarConfig()
    audio: AudioEncoderConfig = DctFramesConfig()
    text: TextEncoderConfig = TextEncoderConfig()
    repa: RepaEncoderConfig | None = Field(None, description="REPA target features (repa.npy); None: off")
