"""Split videos into clips at shot boundaries: one input row becomes one row per clip (a flat_map).

Training on a clip that spans a hard cut teaches the model that scenes teleport, so cuts are found on
decoded frames (histogram change between consecutive analysis frames), shots are cut further into pieces
no longer than `max_seconds`, and pieces shorter than `min_seconds` are dropped. A video left with no
piece at all stays as one `filtered` row, so every input is still accounted for.
"""
from __future__ import annotations

import math
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydantic import Field, model_validator

from latentforge.datasets import media
from latentforge.datasets.video import decode_frames_at, frame_indices
from latentforge.pipelines.resources import StageResources, Strict
from latentforge.pipelines.stage import Batch, Stage, error_message, rows_of
from latentforge.pipelines.staging import staged

# source_rows: how many rows the source input became (its clips, or 1), so a consumer of the stream knows when
# every row of an input has arrived.
CLIP_COLUMNS: dict[str, Any] = {"clip_start_s": 0.0, "clip_end_s": 0.0, "clip_index": -1, "source_id": "",
                                "source_rows": 1}
_HUE_BINS, _VALUE_BINS = 12, 16


class ClipSplitConfig(Strict):
    """Shot-boundary detection and clip lengths; off by default because it multiplies the row count."""

    enabled: bool = Field(False, description="split videos into clips; when off the stage only adds clip columns")
    threshold: float = Field(0.3, gt=0, le=1, description="histogram change in [0, 1] between analysis frames "
                             "above which a cut is declared")
    min_seconds: float = Field(1.0, ge=0, description="pieces shorter than this are dropped")
    max_seconds: float = Field(10.0, gt=0, description="longer shots are cut into equal pieces no longer than this")
    analysis_fps: float = Field(8.0, gt=0, description="frames per second decoded to look for cuts")
    analysis_size: int = Field(64, ge=8, le=512, description="side of the square analysis frames (px)")

    @model_validator(mode="after")
    def _lengths_ordered(self) -> ClipSplitConfig:
        if self.min_seconds > self.max_seconds:
            raise ValueError(f"min_seconds {self.min_seconds} > max_seconds {self.max_seconds}")
        return self


# ---------------------------------------------------------------- shot boundaries


def _soft_histograms(pos: np.ndarray, weight: np.ndarray, bins: int, circular: bool) -> np.ndarray:
    """(N, P) bin positions -> (N, bins) histograms, each pixel split linearly between its two nearest bins.

    Soft binning keeps a flat colour that sits on a bin edge from flipping bins under compression noise,
    which hard bins would report as a change of half the frame.
    """
    n = pos.shape[0]
    lo = np.floor(pos).astype(np.int64)
    frac = pos - lo
    hi = lo + 1
    lo, hi = (lo % bins, hi % bins) if circular else (np.clip(lo, 0, bins - 1), np.clip(hi, 0, bins - 1))
    offsets = (np.arange(n) * bins)[:, None]
    out = np.bincount((lo + offsets).ravel(), (weight * (1 - frac)).ravel(), minlength=n * bins)
    out += np.bincount((hi + offsets).ravel(), (weight * frac).ravel(), minlength=n * bins)
    return out.reshape(n, bins)


def frame_differences(frames: np.ndarray) -> np.ndarray:
    """Content change in [0, 1] between consecutive RGB frames (N,) -> (N-1,).

    The larger of two histogram distances (total variation): brightness alone misses a cut between two
    scenes of equal luma and different colour, hue alone misses one between two grey scenes. Histograms
    ignore where things are, so motion inside a shot barely registers.
    """
    hsv = np.stack([np.asarray(Image.fromarray(f).convert("HSV")) for f in frames]).astype(np.float32) / 255
    n = len(frames)
    h, s, v = (hsv[..., c].reshape(n, -1) for c in range(3))
    chroma = np.clip((s - 0.1) / 0.2, 0, 1)  # hue of a near-grey pixel is noise: its weight goes to a grey bin
    hue = _soft_histograms(h * _HUE_BINS, chroma, _HUE_BINS, circular=True)
    hue = np.concatenate([hue, (1 - chroma).sum(axis=1, keepdims=True)], axis=1)
    value = _soft_histograms(v * (_VALUE_BINS - 1), np.ones_like(v), _VALUE_BINS, circular=False)
    pixels = h.shape[1]
    tv = [0.5 * np.abs(np.diff(hist, axis=0)).sum(axis=1) / pixels for hist in (hue, value)]
    return np.maximum(*tv)


def detect_cuts(uri: str | Path, duration_s: float, cfg: ClipSplitConfig, timeout_s: float) -> list[float]:
    """Times (s) at which a new shot starts, to within 1 / analysis_fps."""
    times = np.arange(math.ceil(duration_s * cfg.analysis_fps - 1e-9)) / cfg.analysis_fps
    if len(times) < 2:
        return []
    side = cfg.analysis_size
    frames, fps = decode_frames_at(uri, times, (side, side), timeout_s=timeout_s, stretch=True)
    starts = frame_indices(times, fps, None) / fps  # the decoded frame's own time, not the asked-for one
    diffs = frame_differences(frames)
    return sorted({float(starts[k + 1]) for k in np.flatnonzero(diffs > cfg.threshold)})


def split_shot(start: float, end: float, cfg: ClipSplitConfig) -> list[tuple[float, float]]:
    """Pieces of one shot no longer than max_seconds and no shorter than min_seconds (possibly none).

    Equal pieces keep the whole shot when they can (3 s at max 2.5 -> 2 x 1.5 s rather than 2.5 + a dropped
    0.5); when equal pieces would fall under min_seconds, full-length pieces are kept and the rest dropped.
    """
    length = end - start
    count = max(1, math.ceil(length / cfg.max_seconds - 1e-9))
    if length / count >= cfg.min_seconds:
        step = length / count
        return [(start + i * step, end if i == count - 1 else start + (i + 1) * step) for i in range(count)]
    pieces, t = [], start
    while end - t >= max(cfg.min_seconds, 1e-9):
        pieces.append((t, min(end, t + cfg.max_seconds)))
        t = pieces[-1][1]
    return pieces


def plan_clips(cuts: list[float], duration_s: float, cfg: ClipSplitConfig) -> list[tuple[float, float]]:
    """Clip (start, end) times from cut times and the video's duration."""
    bounds = [0.0, *(c for c in cuts if 0.0 < c < duration_s), duration_s]
    return [piece for a, b in pairwise(bounds) for piece in split_shot(a, b, cfg)]


# ---------------------------------------------------------------- the stage


def _batch_of(rows: list[dict], keys: list[str]) -> Batch:
    """Rows -> columns; text and missing values as object arrays, so a column never becomes a fixed-width str."""
    out = {}
    for key in keys:
        values = [row[key] for row in rows]
        if not values or any(v is None or isinstance(v, (str, bytes, list, dict, np.ndarray)) for v in values):
            column = np.empty(len(values), dtype=object)
            column[:] = values if values else []
            out[key] = column
        else:
            out[key] = np.asarray(values)
    return out


class SplitClips(Stage):
    """Replace each ok video row by one row per clip; every other row passes with whole-file clip columns."""

    name = "split_clips"
    resources = StageResources(num_cpus=1.0, batch_size=4, pool=2)
    outputs = CLIP_COLUMNS

    def __call__(self, batch: Batch) -> Batch:
        rows = rows_of(batch)
        out = [clip for row in rows for clip in self.expand(row)]
        return _batch_of(out, [*batch, *(k for k in CLIP_COLUMNS if k not in batch)])

    def expand(self, row: dict) -> list[dict]:
        whole = {**row, "clip_start_s": 0.0, "clip_end_s": float(row.get("duration_s", 0.0) or 0.0),
                 "clip_index": -1, "source_id": row["id"], "source_rows": 1}
        if not self.cfg.clips.enabled or row["status"] != "ok" or row.get("modality") != "video":
            return [whole]
        try:
            with staged(row) as local:  # inputs at a URI are decoded from a scratch copy
                clips = self.clips_of(local)
        except media.MediaError as e:
            return [{**whole, "status": "rejected", "reason": e.reason, "message": str(e), "stage": self.name}]
        except Exception as e:  # a bug or an unforeseen file must cost one sample, never the job
            return [{**whole, "status": "rejected", "reason": "stage_error", "stage": self.name,
                     "message": error_message(e)}]
        if not clips:
            return [{**whole, "status": "filtered", "reason": "no_clip_long_enough", "stage": self.name,
                     "message": f"no shot or piece reaches {self.cfg.clips.min_seconds:g}s"}]
        return [{**row, "id": f"{row['id']}c{i:03d}", "clip_start_s": float(a), "clip_end_s": float(b),
                 "clip_index": i, "source_id": row["id"], "source_rows": len(clips)} for i, (a, b) in enumerate(clips)]

    def clips_of(self, row: dict) -> list[tuple[float, float]]:
        duration = float(row.get("duration_s", 0.0) or 0.0)
        if duration <= 0:  # not probed yet: ask the decoder
            duration = media.probe(row["uri"], timeout_s=self.cfg.decode_timeout_s).duration_s
        cuts = detect_cuts(row["uri"], duration, self.cfg.clips, self.cfg.decode_timeout_s)
        return plan_clips(cuts, duration, self.cfg.clips)
