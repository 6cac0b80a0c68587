"""Sharpness of images and of the middle frame of videos (of each clip, for split videos): variance of the
Laplacian of the grayscale frame.

The frame is resized (aspect kept, longer side `size`) before scoring, so the score compares across source
resolutions: it measures how much fine detail survives at that working size. Images smaller than the
working size are upsampled and therefore score lower, as they will look at training resolution too.
Uniform frames score 0; a sharp edge pattern scores in the thousands (uint8 intensities).
"""
from __future__ import annotations

import numpy as np
from pydantic import Field

from latentforge.datasets import media, video
from latentforge.pipelines.resources import StageResources, Strict
from latentforge.pipelines.stage import Reject, Stage

VISUAL = ("image", "video")


class SharpnessConfig(Strict):
    """Laplacian-variance sharpness of images and middle video frames; thresholds decide `keep`."""

    enabled: bool = Field(True, description="score images and videos (when off, rows pass with default scores)")
    size: int = Field(256, ge=16, description="longer side of the working frame the Laplacian runs on (px)")
    min_sharpness: float = Field(0.0, ge=0, description="samples with score_sharpness below this are filtered")


def working_size(row: dict, size: int) -> tuple[int, int]:
    """(H, W) with the row's aspect ratio and longer side `size`; square when the row has no known shape."""
    width, height = int(row.get("width", 0) or 0), int(row.get("height", 0) or 0)
    if width <= 0 or height <= 0:
        return size, size
    scale = size / max(width, height)
    return max(1, round(height * scale)), max(1, round(width * scale))


def clip_span(row: dict) -> tuple[float, float] | None:
    """(clip_start_s, clip_end_s) of a clip row (a video split by SplitClips); None for any unsplit row."""
    if row.get("modality") != "video" or int(row.get("clip_index", -1)) < 0:
        return None
    return float(row["clip_start_s"]), float(row["clip_end_s"])


def decode_still(row: dict, size: int, timeout_s: float) -> np.ndarray:
    """The image, the middle frame of a clip (split videos) or of the whole video, as uint8 (H, W, 3) RGB at
    `working_size`. Undecodable media raise `Reject` with the media reason."""
    shape = working_size(row, size)
    try:
        if row["modality"] == "image":
            return media.decode_image(row["uri"], shape)
        span = clip_span(row)
        if span is not None:  # one frame of [start, end) = its middle one
            frames, _ = video.decode_clip(row["uri"], *span, 1, shape, timeout_s=timeout_s)
        else:
            frames, _ = video.decode_video(row["uri"], 1, shape, timeout_s=timeout_s)  # one frame = the middle one
        return frames[0]
    except media.MediaError as e:
        raise Reject(e.reason, str(e)) from e


def laplacian_variance(rgb: np.ndarray) -> float:
    """Variance of the 3x3 Laplacian of the luma: high for crisp edges and texture, ~0 for blur."""
    import cv2

    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


class FilterSharpness(Stage):
    """Scores sharpness of images and videos; audio rows pass through with the default score."""

    name = "filter_sharpness"
    resources = StageResources(num_cpus=0.5, batch_size=16, pool=1)
    outputs = {"score_sharpness": 0.0}

    def __call__(self, batch):
        # Scores first for every ok row, the verdict afterwards, so a filtered row keeps its score.
        scored = super().__call__(batch)
        return self._verdicts(scored) if self.cfg.sharpness.enabled else scored

    def process_row(self, row: dict) -> dict:
        cfg = self.cfg.sharpness
        if not cfg.enabled or row["modality"] not in VISUAL:
            return {}
        return {"score_sharpness": laplacian_variance(decode_still(row, cfg.size, self.cfg.decode_timeout_s))}

    def _verdicts(self, batch):
        minimum = self.cfg.sharpness.min_sharpness
        for i, status in enumerate(batch["status"]):
            if status != "ok" or batch["modality"][i] not in VISUAL:
                continue
            sharpness = float(batch["score_sharpness"][i])
            if sharpness < minimum:
                batch["status"][i], batch["stage"][i] = "filtered", self.name
                batch["reason"][i] = "sharpness_below_min"
                batch["message"][i] = f"Laplacian variance {sharpness:.1f} < {minimum}"
        return batch
