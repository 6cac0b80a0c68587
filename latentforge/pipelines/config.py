"""Typed configuration of a curation job; every model forbids unknown keys."""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from latentforge.datasets.buckets import Bucket
from latentforge.datasets.encoders.config import EncodersConfig
from latentforge.datasets.storage import Location
from latentforge.pipelines.resources import StageResources, Strict
from latentforge.pipelines.stages.caption_select import CaptioningConfig
from latentforge.pipelines.stages.dedup import DedupConfig
from latentforge.pipelines.stages.filter_audio import AudioQualityConfig
from latentforge.pipelines.stages.filter_motion import MotionConfig
from latentforge.pipelines.stages.filter_sharpness import SharpnessConfig
from latentforge.pipelines.stages.filter_text_area import TextAreaConfig
from latentforge.pipelines.stages.score_aesthetic import AestheticConfig
from latentforge.pipelines.stages.score_nsfw import NsfwConfig
from latentforge.pipelines.stages.split_clips import ClipSplitConfig


class FilterConfig(Strict):
    """Thresholds of the basic filters; scores are always written, these decide `keep`."""

    min_side: int = Field(32, ge=1, description="smallest accepted width/height of images and videos (px)")
    min_frames: int = Field(4, ge=1, description="fewest accepted video frames")
    min_duration_s: float = Field(0.25, ge=0, description="shortest accepted audio/video duration (s)")
    min_sample_rate: int = Field(16000, ge=1, description="lowest accepted audio sample rate (Hz)")
    max_pixels: int = Field(64_000_000, ge=1, description="larger images are refused as decompression bombs")


class FusionConfig(Strict):
    """How stages become Ray Data maps. Ray Data never fuses two actor maps, so by default consecutive stages
    asking for the same GPUs run as one chain per actor: each actor loads the chain's models once and batches
    pass from stage to stage in memory. Off: one actor pool (or task map) per stage, as declared."""

    enabled: bool = Field(True, description="fuse consecutive stages with the same GPU request into one map")
    pool: int | None = Field(None, ge=1, description=(
        "actors of each CPU-only map; default: its share of the cluster's CPUs beside the GPU pools"))
    keep_inputs_mb: int = Field(1024, ge=0, description=(
        "scratch copies of remote inputs (s3://...) one chain's batch keeps for its later stages, per worker; "
        "past it, each stage that decodes a file fetches it again (0: always)"))


class CurationConfig(Strict):
    """One curation job: raw media under `input_dir` -> latent shards, manifest, rejects and card."""

    name: str = Field("dataset", pattern=r"^[A-Za-z0-9_-]+$", description="dataset name (a directory)")
    input_dir: Location = Field(Path("corpus"), description=(
        "root of the raw media, a directory or a URI prefix (s3://bucket/corpus); sidecar .txt files are captions"))
    output_dir: Location | None = Field(None, description=(
        "dataset directory or URI (s3://bucket/datasets/NAME); default WORKDIR/datasets/NAME"))
    generate_demo_corpus: bool = Field(False, description="generate the demo corpus into input_dir if missing")
    demo_seed: int = 0
    image_size: int = Field(32, ge=8, description="side of the default square bucket when `buckets` is empty")
    video_frames: int = Field(4, ge=1, description="frames per clip of the default bucket")
    buckets: list[Bucket] = Field(default_factory=list, description="(height, width, frames) buckets")
    audio_sample_rate: int = Field(8000, ge=1000, description="audio rate for encoders without their own")
    audio_seconds: float = Field(1.0, gt=0, description="audio is cut / padded to this length")
    samples_per_shard: int = Field(64, ge=1, description="most samples in one shard")
    max_shard_mb: float = Field(256.0, gt=0, description="a shard is closed once it reaches this size")
    decode_timeout_s: float = Field(30.0, gt=0, description="a decode that takes longer is rejected")
    filters: FilterConfig = FilterConfig()
    clips: ClipSplitConfig = ClipSplitConfig()
    dedup: DedupConfig = DedupConfig()
    sharpness: SharpnessConfig = SharpnessConfig()
    motion: MotionConfig = MotionConfig()
    text_area: TextAreaConfig = TextAreaConfig()
    aesthetic: AestheticConfig = AestheticConfig()
    nsfw: NsfwConfig = NsfwConfig()
    captioning: CaptioningConfig = CaptioningConfig()
    audio_quality: AudioQualityConfig = AudioQualityConfig()
    encoders: EncodersConfig = EncodersConfig()
    resources: dict[str, StageResources] = Field(
        default_factory=dict, description="per-stage overrides of declared resources, by stage name"
    )
    fusion: FusionConfig = FusionConfig()
    shard_writes: Literal["auto", "workers", "driver"] = Field("auto", description=(
        "who writes the shard tars: the workers of the last stage map (each writes the groups it finished; "
        "no latent crosses to the driver) or the driver (every row streams to it). auto: the workers when the "
        "output is a URI (s3://...), else the driver; choose workers on a cluster writing to a path every "
        "node mounts (NFS)"))
    resume_check: Literal["size", "sha256"] = Field("size", description=(
        "how a rerun checks the tars of the shard groups an earlier run finished before keeping them: size (the "
        "size each group's marker recorded, from one listing: a tar cut short or rewritten at another size "
        "is redone; `latentforge verify` hashes every tar) or sha256 (every tar read back and hashed: on an "
        "object store, the whole dataset downloaded)"))

    # How the job runs, not what it produces: left out of the config hash, so a resumed job may change them.
    EXECUTION_FIELDS: ClassVar[frozenset[str]] = frozenset({"resources", "fusion", "shard_writes", "resume_check"})

    @field_validator("resources")
    @classmethod
    def _known_stages(cls, value: dict[str, StageResources]) -> dict[str, StageResources]:
        """A misspelt stage name would otherwise be ignored (stages look their name up)."""
        if value:
            from latentforge.pipelines.curate import SCAN_STAGES, STAGES  # here: curate imports this module

            known = sorted({s.name for s in SCAN_STAGES + STAGES})
            unknown = sorted(set(value) - set(known))
            if unknown:
                raise ValueError(f"unknown stage {', '.join(map(repr, unknown))} (stages: {', '.join(known)})")
        return value

    def bucket_table(self) -> list[Bucket]:
        return self.buckets or [Bucket(height=self.image_size, width=self.image_size, frames=self.video_frames)]
