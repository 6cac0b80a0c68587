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


# Shot detection decodes a video in windows of analysis frames, each under its own decode timeout: one decode
# of a whole film outlives any per-decode timeout (7.4 s for 120 s of 640x360 H.264 on one thread) and holds
# every analysis frame at once. A window spans at most WINDOW_SECONDS of video (what a decode costs: every
# native frame in the span is decoded) and at most WINDOW_FRAMES frames or WINDOW_PIXELS pixels (what it holds).
WINDOW_SECONDS = 16.0
WINDOW_FRAMES = 256
WINDOW_PIXELS = 1 << 22  # 4 Mpx: 256 frames at 128 px, 16 at the 512 px maximum; ~12 MB uint8, ~50 MB float32


def analysis_window(cfg: ClipSplitConfig) -> int:
    """Analysis frames decoded per call in `detect_cuts` (at least 2)."""
    return max(2, min(WINDOW_FRAMES, int(WINDOW_SECONDS * cfg.analysis_fps), WINDOW_PIXELS // cfg.analysis_size**2))


Histograms = tuple[np.ndarray, np.ndarray]  # (N, hue bins + grey) and (N, value bins), in pixels


def frame_histograms(frames: np.ndarray) -> Histograms:
    """Soft hue and value histograms of RGB frames (N, H, W, 3); see `frame_differences`."""
    hsv = np.stack([np.asarray(Image.fromarray(f).convert("HSV")) for f in frames]).astype(np.float32) / 255
    n = len(frames)
    h, s, v = (hsv[..., c].reshape(n, -1) for c in range(3))
    chroma = np.clip((s - 0.1) / 0.2, 0, 1)  # hue of a near-grey pixel is noise: its weight goes to a grey bin
    hue = _soft_histograms(h * _HUE_BINS, chroma, _HUE_BINS, circular=True)
    hue = np.concatenate([hue, (1 - chroma).sum(axis=1, keepdims=True)], axis=1)
    value = _soft_histograms(v * (_VALUE_BINS - 1), np.ones_like(v), _VALUE_BINS, circular=False)
    return hue, value


def histogram_differences(hists: Histograms) -> np.ndarray:
    """(N,) histograms -> (N-1,) changes in [0, 1] between consecutive ones; see `frame_differences`."""
    pixels = hists[1][0].sum() if len(hists[1]) else 1.0  # value weights are 1 per pixel
    pixels = round(float(pixels))
    tv = [0.5 * np.abs(np.diff(hist, axis=0)).sum(axis=1) / pixels for hist in hists]
    return np.maximum(*tv)


def _take(hists: Histograms, rows) -> Histograms:
    return hists[0][rows], hists[1][rows]


def _join(*parts: Histograms) -> Histograms:
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def frame_differences(frames: np.ndarray) -> np.ndarray:
    """Content change in [0, 1] between consecutive RGB frames (N,) -> (N-1,).

    The larger of two histogram distances (total variation): brightness alone misses a cut between two
    scenes of equal luma and different colour, hue alone misses one between two grey scenes. Histograms
    ignore where things are, so motion inside a shot barely registers.
    """
    return histogram_differences(frame_histograms(frames))


def detect_cuts(uri: str | Path, duration_s: float, cfg: ClipSplitConfig, timeout_s: float) -> list[float]:
    """Times (s) at which a new shot starts: the time of the new shot's first native frame (index / fps).

    Analysis frames are decoded window by window (`analysis_window`), each window under `timeout_s`; the last
    histogram of a window is carried into the next, so the changes are those of one decode of every frame.
    """
    times = np.arange(math.ceil(duration_s * cfg.analysis_fps - 1e-9)) / cfg.analysis_fps
    if len(times) < 2:
        return []
    size, window = (cfg.analysis_size, cfg.analysis_size), analysis_window(cfg)
    cuts: set[float] = set()
    carried: tuple[np.ndarray, Histograms] | None = None  # the previous window's last (native index, histogram)
    for lo in range(0, len(times), window):
        chunk = times[lo : lo + window]
        frames, fps = decode_frames_at(uri, chunk, size, timeout_s=timeout_s, stretch=True)
        native = frame_indices(chunk, fps, None)  # the decoded frame's own index, not the asked-for time's
        hists = frame_histograms(frames)
        del frames
        if carried is not None:
            native, hists = np.concatenate([carried[0], native]), _join(carried[1], hists)
        found = np.flatnonzero(histogram_differences(hists) > cfg.threshold)
        cuts.update(_first_frames_of_shots(uri, native, hists, found, fps, cfg, timeout_s))
        carried = native[-1:], _take(hists, slice(-1, None))
    return sorted(cuts)


def _first_frames_of_shots(uri: str | Path, native: np.ndarray, hists: Histograms, found: np.ndarray, fps: float,
                           cfg: ClipSplitConfig, timeout_s: float) -> list[float]:
    """Each cut found between analysis frames k and k + 1, moved to the native frame where the shot changes.

    Analysis frames sit up to fps / analysis_fps native frames apart: a cut placed at frame k + 1 would leave
    the start of the next shot at the end of the clip before. The native frames in between are decoded (at
    most fps / analysis_fps per cut, in calls of at most a window's frames, each under `timeout_s`) and the cut
    goes to the first frame of the largest change between consecutive frames.
    """
    gaps = [(int(native[k]), int(native[k + 1]), k) for k in found]
    inner = sorted({i for a, b, _ in gaps for i in range(a + 1, b)})
    between: dict[int, Histograms] = {}
    size, window = (cfg.analysis_size, cfg.analysis_size), analysis_window(cfg)
    for lo in range(0, len(inner), window):
        indices = inner[lo : lo + window]
        frames, _ = decode_frames_at(uri, np.asarray(indices) / fps, size, timeout_s=timeout_s, stretch=True)
        decoded = frame_histograms(frames)
        between.update((index, _take(decoded, slice(row, row + 1))) for row, index in enumerate(indices))
    cuts = []
    for a, b, k in gaps:
        if b - a > 1:
            run = _join(_take(hists, slice(k, k + 1)), *(between[i] for i in range(a + 1, b)),
                        _take(hists, slice(k + 1, k + 2)))
            b = a + 1 + int(np.argmax(histogram_differences(run)))
        cuts.append(b / fps)
    return cuts


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
