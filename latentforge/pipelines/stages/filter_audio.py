"""Audio quality scores: loudness, silence, clipping and speech, each a column; thresholds decide `keep`.

All scores are computed on the first `max_seconds` of the file, mixed to mono and resampled (linearly) to
`sample_rate`:
- `score_loudness`: integrated loudness in LUFS per ITU-R BS.1770-4 (K-weighting, 400 ms blocks, absolute
  and relative gates) via pyloudnorm. Clips shorter than one block are zero-padded to it; a signal with no
  block above the -70 LUFS absolute gate (digital silence) scores `LOUDNESS_FLOOR_LUFS` instead of -inf, so
  the column stays finite.
- `score_silence_ratio`: fraction of 20 ms frames whose RMS level is below -50 dBFS (RMS of a full-scale
  square wave = 0 dBFS).
- `score_clipping_ratio`: fraction of samples with |x| >= 0.999 of full scale.
- `score_speech_ratio`: fraction of Silero VAD windows (32 ms) whose speech probability exceeds 0.5. The
  ONNX model ships inside the `silero-vad` wheel and runs on onnxruntime directly (no torch, no download).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from latentforge.datasets import media
from latentforge.pipelines.resources import StageResources, Strict
from latentforge.pipelines.stage import Reject, Stage, error_message, mark_row

LOUDNESS_FLOOR_LUFS = -120.0
SILENCE_DBFS = -50.0
SILENCE_FRAME_S = 0.02
CLIP_LEVEL = 0.999
SPEECH_PROBABILITY = 0.5
_LOUDNESS_BLOCK_S = 0.4
# Silero's streaming contract: fixed windows, each prefixed by the tail (context) of the previous input.
_VAD_WINDOW = {16000: 512, 8000: 256}
_VAD_CONTEXT = {16000: 64, 8000: 32}


class AudioQualityConfig(Strict):
    """Loudness / silence / clipping / speech scoring of audio; scores are always written, thresholds decide."""

    enabled: bool = Field(True, description="score audio (when off, rows pass with default scores)")
    sample_rate: Literal[8000, 16000] = Field(16000, description="rate audio is resampled to (Silero VAD's rates)")
    max_seconds: float = Field(30.0, gt=0, description="only the first max_seconds of each file are scored")
    min_loudness_lufs: float = Field(-70.0, description="audio with score_loudness below this is filtered (LUFS)")
    max_silence_ratio: float = Field(
        1.0, ge=0, le=1, description="audio with more than this fraction of silent 20 ms frames is filtered"
    )
    max_clipping_ratio: float = Field(
        1.0, ge=0, le=1, description="audio with more than this fraction of clipped samples is filtered"
    )
    min_speech_ratio: float = Field(
        0.0, ge=0, le=1, description="audio with less than this fraction of speech windows is filtered (0 keeps all)"
    )


def integrated_loudness(signal: np.ndarray, sample_rate: int) -> float:
    """BS.1770-4 integrated loudness (LUFS) of a mono signal; see the module docstring for the edge cases."""
    import pyloudnorm

    block = int(np.ceil(_LOUDNESS_BLOCK_S * sample_rate)) + 1  # pyloudnorm wants strictly more than a block
    padded = np.pad(signal.astype(np.float64), (0, max(0, block - len(signal))))
    lufs = pyloudnorm.Meter(sample_rate).integrated_loudness(padded)
    return float(lufs) if np.isfinite(lufs) else LOUDNESS_FLOOR_LUFS


def silence_ratio(signal: np.ndarray, sample_rate: int) -> float:
    """Fraction of whole 20 ms frames whose RMS is below SILENCE_DBFS (a partial last frame is ignored)."""
    frame = max(1, int(SILENCE_FRAME_S * sample_rate))
    count = len(signal) // frame
    if count == 0:
        return 1.0
    frames = signal[: count * frame].astype(np.float64).reshape(count, frame)
    rms = np.sqrt(np.mean(frames**2, axis=1))
    return float(np.mean(rms < 10 ** (SILENCE_DBFS / 20)))


def clipping_ratio(signal: np.ndarray) -> float:
    """Fraction of samples at or beyond CLIP_LEVEL of full scale."""
    return float(np.mean(np.abs(signal) >= CLIP_LEVEL)) if len(signal) else 0.0


def silero_model_path() -> Path:
    """The ONNX model inside the installed silero-vad wheel, found without importing the package (and torch)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("silero-vad is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx"


def load_silero_vad():
    """An onnxruntime session of Silero VAD on one CPU thread (the model is small and strictly sequential)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    return onnxruntime.InferenceSession(str(silero_model_path()), options, providers=["CPUExecutionProvider"])


def speech_ratio(session, signal: np.ndarray, sample_rate: int) -> float:
    """Fraction of whole VAD windows whose speech probability exceeds SPEECH_PROBABILITY (0 if none fit)."""
    return speech_ratios(session, [signal], sample_rate)[0]


def speech_ratios(session, signals: list[np.ndarray], sample_rate: int) -> list[float]:
    """`speech_ratio` of several signals in one pass: window j of every signal that has one goes through the
    model as one batch (Silero's state is per batch row), so B clips cost max(windows) session calls, not the
    sum. Each row sees exactly the inputs it would alone, so the probabilities are the same as one clip at a
    time. Rows run longest first, and a row leaves the batch after its last window (no padding computed).

    One call per 32 ms window made VAD the costliest score in curation (about 170 us per call, most of it
    onnxruntime's per-call overhead); 16 clips per pass take 2.4x less CPU for the same ratios (bench/vad.py,
    BENCHMARKS.md)."""
    window, context_size = _VAD_WINDOW[sample_rate], _VAD_CONTEXT[sample_rate]
    counts = np.array([len(s) // window for s in signals], dtype=np.int64)
    order = np.argsort(-counts, kind="stable")  # longest first: the rows still running are always a prefix
    longest = int(counts.max(initial=0))
    windows = np.zeros((len(signals), longest, window), dtype=np.float32)
    for row, i in enumerate(order):
        windows[row, : counts[i]] = signals[i][: counts[i] * window].reshape(counts[i], window)
    state = np.zeros((2, len(signals), 128), dtype=np.float32)
    context = np.zeros((len(signals), context_size), dtype=np.float32)
    rate = np.array(sample_rate, dtype=np.int64)
    speech = np.zeros(len(signals), dtype=np.int64)
    running = np.searchsorted(-counts[order], -np.arange(1, longest + 1), side="right")  # rows with > j windows
    for j, active in enumerate(running):
        x = np.concatenate([context[:active], windows[:active, j]], axis=1)
        probability, state[:, :active] = session.run(None, {"input": x, "state": state[:, :active], "sr": rate})
        context[:active] = x[:, -context_size:]
        speech[:active] += probability[:, 0] > SPEECH_PROBABILITY
    ratios = np.zeros(len(signals))
    ratios[order] = np.where(counts[order] > 0, speech / np.maximum(counts[order], 1), 0.0)
    return [float(r) for r in ratios]


class _PendingSpeech:
    """A row's decoded signal waiting for the batch's one VAD pass (see FilterAudioQuality.__call__)."""

    def __init__(self, signal: np.ndarray):
        self.signal = signal


class FilterAudioQuality(Stage):
    """Scores audio loudness, silence, clipping and speech; image and video rows pass with default scores."""

    name = "filter_audio"
    # 64 rows: VAD runs once per batch over its audio rows (speech_ratios), and in a mixed corpus a quarter of
    # the rows may be audio; the other rows cost nothing here.
    resources = StageResources(num_cpus=0.5, batch_size=64, pool=1)
    outputs = {"score_loudness": 0.0, "score_silence_ratio": 0.0, "score_clipping_ratio": 0.0,
               "score_speech_ratio": 0.0}

    def __init__(self, cfg):
        super().__init__(cfg)
        self.vad = load_silero_vad() if cfg.audio_quality.enabled else None

    def __call__(self, batch):
        # Scores first for every ok row, the verdict afterwards, so a filtered row keeps its scores.
        scored = super().__call__(batch)
        if not self.cfg.audio_quality.enabled:
            return scored
        return self._verdicts(self._speech(scored))

    def _speech(self, batch):
        """Fill score_speech_ratio of the rows process_row left pending, with one batched VAD pass."""
        column = list(batch["score_speech_ratio"])
        pending = [i for i, v in enumerate(column) if isinstance(v, _PendingSpeech)]
        if pending:
            try:
                ratios = speech_ratios(self.vad, [column[i].signal for i in pending], self.cfg.audio_quality.sample_rate)
            except Exception as e:  # noqa: BLE001 - as map_ok_rows does per row: the rows are lost, never the job
                for i in pending:
                    column[i] = 0.0
                    mark_row(batch, i, self.name, "rejected", "stage_error", error_message(e))
            else:
                for i, ratio in zip(pending, ratios, strict=True):
                    column[i] = ratio
        batch["score_speech_ratio"] = np.asarray(column, dtype=np.float64)
        return batch

    def process_row(self, row: dict) -> dict:
        cfg = self.cfg.audio_quality
        if not cfg.enabled or row["modality"] != "audio":
            return {}
        signal = self._decode(row, cfg)
        rate = cfg.sample_rate
        return {
            "score_loudness": integrated_loudness(signal, rate),
            "score_silence_ratio": silence_ratio(signal, rate),
            "score_clipping_ratio": clipping_ratio(signal),
            "score_speech_ratio": _PendingSpeech(signal.astype(np.float32, copy=False)),
        }

    @staticmethod
    def _decode(row: dict, cfg: AudioQualityConfig) -> np.ndarray:
        # The probed duration bounds the read: decode_audio zero-pads to the length asked, which would add silence.
        duration = float(row.get("duration_s", 0.0) or 0.0)
        seconds = min(duration, cfg.max_seconds) if duration > 0 else cfg.max_seconds
        try:
            return media.decode_audio(row["uri"], cfg.sample_rate, max(1, round(seconds * cfg.sample_rate)))
        except media.MediaError as e:
            raise Reject(e.reason, str(e)) from e

    def _verdicts(self, batch):
        for i, status in enumerate(batch["status"]):
            if status != "ok" or batch["modality"][i] != "audio":
                continue
            scores = {k: float(batch[k][i]) for k in self.outputs}
            verdict = self._verdict(scores, self.cfg.audio_quality)
            if verdict:
                mark_row(batch, i, self.name, "filtered", *verdict)
        return batch

    @staticmethod
    def _verdict(s: dict[str, float], cfg: AudioQualityConfig) -> tuple[str, str] | None:
        if s["score_loudness"] < cfg.min_loudness_lufs:
            return "loudness_below_min", f"loudness {s['score_loudness']:.1f} LUFS < {cfg.min_loudness_lufs} LUFS"
        if s["score_silence_ratio"] > cfg.max_silence_ratio:
            return "silence_above_max", f"{s['score_silence_ratio']:.0%} silent frames > {cfg.max_silence_ratio:.0%}"
        if s["score_clipping_ratio"] > cfg.max_clipping_ratio:
            clipped = s["score_clipping_ratio"]
            return "clipping_above_max", f"{clipped:.2%} clipped samples > {cfg.max_clipping_ratio:.2%}"
        if s["score_speech_ratio"] < cfg.min_speech_ratio:
            return "speech_below_min", f"{s['score_speech_ratio']:.0%} speech windows < {cfg.min_speech_ratio:.0%}"
        return None
