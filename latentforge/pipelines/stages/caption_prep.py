"""CPU preparation for the captioners: decode what they need into the row, so GPU actors never wait on decoding.

Visual rows get `captioning.vlm.frames` evenly spaced frames of their clip (its [clip_start_s, clip_end_s) span
from SplitClips; 1 frame for images) at the captioner's square input size; audio rows, and videos with an audio
track (that clip's span of it), get a 16 kHz mono waveform. Both travel as npy bytes (a plain binary column, no
Python objects in the blocks). A file that cannot be decoded here could not be encoded either, so it is rejected
with the decoder's reason; a video's broken audio track only costs its transcript (noted in `caption_error`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from latentforge.datasets import audio, media, video
from latentforge.datasets.shards import npy_bytes
from latentforge.datasets.video import decode_frames_at
from latentforge.pipelines.resources import StageResources
from latentforge.pipelines.stage import Batch, Reject, Stage, map_ok_rows
from latentforge.pipelines.stages.caption_audio import AUDIO_COLUMN, AudioCaptionConfig
from latentforge.pipelines.stages.caption_vlm import FRAMES_COLUMN, VLMCaptionConfig

if TYPE_CHECKING:
    from latentforge.pipelines.config import CurationConfig


def frame_times(start_s: float, end_s: float, fps: float, count: int) -> np.ndarray:
    """Centres of up to `count` equal segments of [start_s, end_s); fewer when the span holds fewer frames."""
    available = round((end_s - start_s) * fps) if fps > 0 else count
    count = max(1, min(count, available))
    step = (end_s - start_s) / count
    return start_s + (np.arange(count) + 0.5) * step


def decode_visual(row: dict, cfg: VLMCaptionConfig, timeout_s: float) -> np.ndarray:
    """uint8 (N, S, S, 3): the image, or evenly spaced frames of the row's clip."""
    size = (cfg.image_size, cfg.image_size)
    if row["modality"] == "image":
        if cfg.resize == "crop":
            return media.decode_image(row["uri"], size)[None]
        native = media.decode_image(row["uri"], (int(row["height"]), int(row["width"])))  # oriented, no resize
        return np.asarray(Image.fromarray(native).resize(size[::-1], Image.Resampling.BICUBIC))[None]
    start, end = float(row.get("clip_start_s", 0.0) or 0.0), float(row.get("clip_end_s", 0.0) or 0.0)
    if end <= start:  # no duration known: spread the frames over the whole file
        return video.decode_video(row["uri"], cfg.frames, size, timeout_s=timeout_s)[0]
    times = frame_times(start, end, float(row.get("fps", 0.0) or 0.0), cfg.frames)
    return decode_frames_at(row["uri"], times, size, timeout_s=timeout_s, stretch=cfg.resize == "stretch")[0]


def decode_speech(row: dict, cfg: AudioCaptionConfig) -> np.ndarray:
    """float32 mono at cfg.sample_rate, at most cfg.max_seconds long."""
    seconds = min(float(row.get("duration_s", 0.0) or cfg.max_seconds), cfg.max_seconds)
    # decode_audio's resampling is anti-aliased: aliasing from 44.1/48 kHz down to 16 kHz would fold hiss into
    # the band Whisper listens to.
    return audio.decode_audio(row["uri"], cfg.sample_rate, max(1, round(seconds * cfg.sample_rate)))


def decode_track(row: dict, cfg: AudioCaptionConfig, timeout_s: float) -> np.ndarray | None:
    """A video's audio track over the row's clip span, at most cfg.max_seconds; None when the file has none."""
    start, end = float(row.get("clip_start_s", 0.0) or 0.0), float(row.get("clip_end_s", 0.0) or 0.0)
    if end <= start:  # no span known: the file from its start
        end = start + cfg.max_seconds
    return audio.decode_video_audio(row["uri"], cfg.sample_rate, start, min(end, start + cfg.max_seconds),
                                    timeout_s=timeout_s)


TRACK_ERROR = "_caption_track_error"  # merged into caption_error by CaptionPrep itself


class CaptionPrep(Stage):
    """Adds `_caption_frames` (visual rows) and/or `_caption_audio` (audio rows, videos' audio tracks)."""

    name = "caption_prep"
    resources = StageResources(num_cpus=1.0, batch_size=8, pool=1)

    @classmethod
    def enabled(cls, cfg: CurationConfig) -> bool:
        return cfg.captioning.vlm.enabled or cfg.captioning.audio.enabled

    def __init__(self, cfg: CurationConfig):
        super().__init__(cfg)
        cap = cfg.captioning
        # Only the columns an enabled captioner consumes (and removes); every row gets them, empty if unused.
        self.columns = {**({FRAMES_COLUMN: b""} if cap.vlm.enabled else {}),
                        **({AUDIO_COLUMN: b"", TRACK_ERROR: ""} if cap.audio.enabled else {})}

    def __call__(self, batch: Batch) -> Batch:
        out = map_ok_rows(batch, self.process_row, self.columns, self.name)
        if TRACK_ERROR in out:
            track = out.pop(TRACK_ERROR)
            errors = np.array(out["caption_error"], dtype=object)
            for i in np.flatnonzero(track != ""):
                errors[i] = f"{errors[i]}; {track[i]}" if errors[i] else track[i]
            out["caption_error"] = errors
        return out

    def process_row(self, row: dict) -> dict:
        cap, modality, out = self.cfg.captioning, row["modality"], {}
        try:
            if modality in ("image", "video") and cap.vlm.enabled:
                out[FRAMES_COLUMN] = npy_bytes(decode_visual(row, cap.vlm, self.cfg.decode_timeout_s))
            if modality == "audio" and cap.audio.enabled:
                out[AUDIO_COLUMN] = npy_bytes(decode_speech(row, cap.audio))
        except media.MediaError as e:
            raise Reject(e.reason, str(e)) from e
        if modality == "video" and cap.audio.enabled:
            try:
                track = decode_track(row, cap.audio, self.cfg.decode_timeout_s)
            except media.MediaError as e:  # the pictures are fine: only the transcript is lost
                return {**out, TRACK_ERROR: f"audio: {e.reason}: {e}"}
            if track is not None and len(track):
                out[AUDIO_COLUMN] = npy_bytes(track)
        return out
