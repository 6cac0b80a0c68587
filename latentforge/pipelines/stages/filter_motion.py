"""Motion scores of video clips from OpenCV dense optical flow (Farneback or DIS; no model weights).

`score_motion`: mean optical-flow magnitude per source frame, as a percentage of the working frame side,
so the number does not depend on the clip's resolution: 1.0 means content moves 1% of the frame width per
frame. Flow is measured between `frames` evenly spaced frames (within the clip's span, for a clip row of a
split video) and divided by their spacing in source frames, which assumes roughly constant speed between
them; run it on short clips (after splitting), where a few frames apart is still trackable.

`score_motion_jitter`: how much the frame-wide mean flow vector changes from one frame pair to the next
(RMS deviation from its average over time), in units of the mean flow magnitude. A steady pan, a zoom or an
object moving steadily score near 0; a shaking camera (direction flipping between pairs) scores near 1 or
above. A clip without motion scores 0.
"""
from __future__ import annotations

from itertools import pairwise
from typing import Literal

import numpy as np
from pydantic import Field

from latentforge.datasets import media, video
from latentforge.pipelines.resources import StageResources, Strict
from latentforge.pipelines.stage import Reject, Stage
from latentforge.pipelines.stages.filter_sharpness import clip_span

# Below this mean flow (pixels between sampled frames) a clip is static and its jitter is meaningless.
_STATIC_FLOW_PX = 0.01


class MotionConfig(Strict):
    """Optical-flow motion scoring of videos; scores are always written, thresholds decide `keep`."""

    enabled: bool = Field(True, description="score videos (when off, rows pass with default scores)")
    frames: int = Field(8, ge=2, description="evenly spaced frames decoded per clip; flow runs between neighbours")
    size: int = Field(128, ge=16, description="frames are resized and centre-cropped to size x size grayscale")
    min_motion: float = Field(0.0, ge=0, description="clips with score_motion below this are filtered (0 keeps all)")
    max_motion: float | None = Field(None, ge=0, description="clips with score_motion above this are filtered")
    method: Literal["farneback", "dis"] = Field("farneback", description="OpenCV dense optical flow algorithm")


def flow_fields(gray: np.ndarray, method: str) -> list[np.ndarray]:
    """Dense flow (H, W, 2) in pixels between each pair of consecutive uint8 (H, W) frames."""
    import cv2

    if method == "dis":
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        return [dis.calc(a, b, None) for a, b in pairwise(gray)]
    # pyr_scale, levels, winsize, iterations, poly_n, poly_sigma, flags: OpenCV's documented defaults,
    # with 3 pyramid levels so displacements of ~10 px at 128 px are still tracked.
    return [cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0) for a, b in pairwise(gray)]


def motion_scores(flows: list[np.ndarray], size: int, frame_gap: float) -> tuple[float, float]:
    """(score_motion, score_motion_jitter) from the flow fields of one clip; see the module docstring."""
    if not flows:
        return 0.0, 0.0
    magnitudes = np.array([np.linalg.norm(f, axis=-1).mean() for f in flows])  # mean |flow| per pair
    vectors = np.array([f.reshape(-1, 2).mean(axis=0) for f in flows])  # frame-wide mean flow per pair
    mean_magnitude = float(magnitudes.mean())
    motion = mean_magnitude / max(frame_gap, 1.0) / size * 100.0
    if mean_magnitude < _STATIC_FLOW_PX:
        return motion, 0.0
    deviation = np.sqrt(np.mean(np.sum((vectors - vectors.mean(axis=0)) ** 2, axis=1)))
    return motion, float(deviation / mean_magnitude)


def to_gray(frames: np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, 3) RGB -> uint8 (T, H, W) luma."""
    import cv2

    return np.stack([cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in frames])


class FilterMotion(Stage):
    """Scores video motion with optical flow; other modalities pass through with default scores."""

    name = "filter_motion"
    resources = StageResources(num_cpus=1.0, batch_size=8, pool=1)
    outputs = {"score_motion": 0.0, "score_motion_jitter": 0.0}

    def __call__(self, batch):
        # Scores first for every ok row, the verdict afterwards, so a filtered row keeps its scores.
        scored = super().__call__(batch)
        return self._verdicts(scored) if self.cfg.motion.enabled else scored

    def process_row(self, row: dict) -> dict:
        cfg = self.cfg.motion
        if not cfg.enabled or row["modality"] != "video":
            return {}
        span = clip_span(row)
        try:
            if span is None:  # an unsplit video: frames evenly spaced over the whole file
                total = int(row.get("num_frames", 0) or 0)
                count = min(cfg.frames, total) if total > 0 else cfg.frames  # no duplicate frames on short clips
                frames, _ = video.decode_video(row["uri"], count, (cfg.size, cfg.size),
                                               timeout_s=self.cfg.decode_timeout_s)
                gap = total / count if total > 0 else 1.0
            else:  # a clip of a split video: frames evenly spaced within [clip_start_s, clip_end_s)
                start, end = span
                fps = float(row.get("fps", 0.0) or 0.0)
                total = round((end - start) * fps)  # source frames in the clip
                count = min(cfg.frames, total) if total > 0 else cfg.frames
                frames, _ = video.decode_clip(row["uri"], start, end, count, (cfg.size, cfg.size),
                                              timeout_s=self.cfg.decode_timeout_s)
                gap = (end - start) * fps / count if fps > 0 else 1.0  # source frames between analysed ones
        except media.MediaError as e:
            raise Reject(e.reason, str(e)) from e
        motion, jitter = motion_scores(flow_fields(to_gray(frames), cfg.method), cfg.size, gap)
        return {"score_motion": float(motion), "score_motion_jitter": float(jitter)}

    def _verdicts(self, batch):
        for i, status in enumerate(batch["status"]):
            if status != "ok" or batch["modality"][i] != "video":
                continue
            verdict = self._verdict(float(batch["score_motion"][i]), self.cfg.motion)
            if verdict:
                batch["status"][i], batch["stage"][i] = "filtered", self.name
                batch["reason"][i], batch["message"][i] = verdict
        return batch

    @staticmethod
    def _verdict(motion: float, cfg: MotionConfig) -> tuple[str, str] | None:
        if motion < cfg.min_motion:
            return "motion_below_min", f"motion {motion:.3f} %/frame < {cfg.min_motion}"
        if cfg.max_motion is not None and motion > cfg.max_motion:
            return "motion_above_max", f"motion {motion:.3f} %/frame > {cfg.max_motion}"
        return None
