"""Resolution / aspect-ratio / duration buckets: each sample gets the (H, W, T) that distorts it least."""
from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field


class Bucket(BaseModel):
    """A pixel-space bucket; images use T=1, clips `frames` frames sampled evenly."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    height: int = Field(ge=2)
    width: int = Field(ge=2)
    frames: int = Field(1, ge=1, description="frames per clip in this bucket (images always 1)")

    @property
    def aspect(self) -> float:
        return self.width / self.height

    def name(self, modality: str) -> str:
        return f"{1 if modality == 'image' else self.frames}x{self.height}x{self.width}"


def choose_bucket(buckets: list[Bucket], width: int, height: int, num_frames: int, modality: str) -> Bucket:
    """Nearest aspect ratio (in log space); for clips, prefer buckets the clip has enough frames for,
    then the most frames. Among those, the largest bucket the source covers (no upscaling), else the
    smallest (the least upscaling). Resizing keeps the aspect ratio and centre-crops the rest."""
    if not buckets:
        raise ValueError("no buckets configured")
    aspect = width / height if width and height else 1.0

    def distortion(b: Bucket) -> float:
        return abs(math.log(b.aspect / aspect))

    pool = buckets
    if modality == "video":
        fitting = [b for b in buckets if b.frames <= num_frames]
        pool = fitting or [min(buckets, key=lambda b: b.frames)]
    best = min(distortion(b) for b in pool)
    tied = [b for b in pool if distortion(b) - best < 1e-9]
    if modality == "video":
        most = max(b.frames for b in tied)
        tied = [b for b in tied if b.frames == most]
    covered = [b for b in tied if b.width <= width and b.height <= height]
    if covered:
        return max(covered, key=lambda b: b.height * b.width)
    return min(tied, key=lambda b: b.height * b.width)
