"""Audio quality scores: loudness, silence, clipping and speech, each a column; thresholds decide `keep`.

All scores are computed on the first `max_seconds` of the file, per channel where the channels matter (a mono
mix hides a clipped channel, cancels out-of-phase content and reads stereo 3 dB low):
- `score_clipping_ratio`: the largest fraction, over channels, of samples with |x| >= 0.999 of full scale,
  on the file's own samples (before resampling, whose low-pass filter rounds clipped runs off).
- `score_loudness`: integrated loudness in LUFS per ITU-R BS.1770-4 (K-weighting, channel weights, 400 ms
  blocks, absolute and relative gates) via pyloudnorm, on the channels resampled (anti-aliased) to `sample_rate`.
  pyloudnorm weighs up to five channels as L R C Ls Rs; files of six channels and more (WAV/FLAC 5.1 order,
  L R C LFE Ls Rs ...) drop the LFE, as BS.1770 does, and are measured on their first five other channels.
  A clip shorter than one block is measured as its own one block; a signal with no block above the -70 LUFS
  absolute gate (digital silence) scores `LOUDNESS_FLOOR_LUFS` instead of -inf, so the column stays finite.
- `score_silence_ratio`: fraction of 20 ms frames whose RMS level is below -50 dBFS (RMS of a full-scale
  square wave = 0 dBFS) in every channel, at `sample_rate`. A clip shorter than one frame is its own frame.
- `score_speech_ratio`: fraction of Silero VAD windows (32 ms) whose speech probability exceeds 0.5, on the
  mono mix at `sample_rate`. The ONNX model ships inside the `silero-vad` wheel and runs on onnxruntime
  directly (no torch, no download).
A file holding a NaN or infinite sample has no defined level: it is rejected as `non_finite_samples`.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from latentforge.datasets import audio, media
from latentforge.pipelines.resources import StageResources, Strict
from latentforge.pipelines.stage import Reject, Stage, error_message, mark_row

LOUDNESS_FLOOR_LUFS = -120.0
SILENCE_DBFS = -50.0
SILENCE_FRAME_S = 0.02
CLIP_LEVEL = 0.999
SPEECH_PROBABILITY = 0.5
_LOUDNESS_BLOCK_S = 0.4
_LOUDNESS_GATE_LUFS = -70.0  # BS.1770's absolute gate
_CHANNEL_WEIGHTS = (1.0, 1.0, 1.0, 1.41, 1.41)  # BS.1770's G of L R C Ls Rs, pyloudnorm's channel order
_LFE = 3  # the LFE's index in WAV and FLAC channel order from 5.1 up (L R C LFE ...)
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


def _channels(signal: np.ndarray) -> np.ndarray:
    """(frames, channels) from (frames,) mono or (frames, channels)."""
    return signal[:, None] if signal.ndim == 1 else signal


def integrated_loudness(signal: np.ndarray, sample_rate: int) -> float:
    """BS.1770-4 integrated loudness (LUFS) of (frames,) mono or (frames, channels); see the module docstring
    for the channels measured and the edge cases."""
    import pyloudnorm

    x = _channels(signal).astype(np.float64)
    if x.shape[1] > len(_CHANNEL_WEIGHTS):
        x = np.delete(x, _LFE, axis=1)[:, : len(_CHANNEL_WEIGHTS)]
    meter = pyloudnorm.Meter(sample_rate)
    if len(x) > _LOUDNESS_BLOCK_S * sample_rate:  # pyloudnorm needs at least one whole block
        lufs = meter.integrated_loudness(x)
    else:  # zero-padding to a block would average the clip with silence: it is its own, shorter, block
        lufs = _one_block_loudness(meter, x)
    return float(lufs) if np.isfinite(lufs) else LOUDNESS_FLOOR_LUFS


def _one_block_loudness(meter, x: np.ndarray) -> float:
    """BS.1770 loudness of `x` (frames, <= 5 channels) as one gating block (the gates reduce to the absolute
    one), K-weighted by the meter's own filters as its integrated_loudness applies them."""
    weighted = x.copy()
    for weighting in meter._filters.values():  # pyloudnorm keeps its K-weighting stages there (0.1 and 0.2)
        for c in range(weighted.shape[1]):
            weighted[:, c] = weighting.apply_filter(weighted[:, c])
    power = float(np.dot(_CHANNEL_WEIGHTS[: x.shape[1]], np.mean(weighted**2, axis=0))) if len(x) else 0.0
    lufs = -0.691 + 10 * np.log10(power) if power > 0 else -np.inf
    return lufs if lufs >= _LOUDNESS_GATE_LUFS else -np.inf


def silence_ratio(signal: np.ndarray, sample_rate: int) -> float:
    """Fraction of whole 20 ms frames whose RMS is below SILENCE_DBFS in every channel of (frames,) or
    (frames, channels). A partial last frame is ignored, unless there is no whole one: then it is the frame."""
    x = _channels(signal).astype(np.float64)
    if len(x) == 0:
        return 1.0
    frame = min(len(x), max(1, int(SILENCE_FRAME_S * sample_rate)))
    count = len(x) // frame
    rms = np.sqrt(np.mean(x[: count * frame].reshape(count, frame, x.shape[1]) ** 2, axis=1))
    return float(np.mean(np.all(rms < 10 ** (SILENCE_DBFS / 20), axis=1)))


def clipping_ratio(signal: np.ndarray) -> float:
    """Largest fraction, over the channels of (frames,) or (frames, channels), of samples at or beyond
    CLIP_LEVEL of full scale: one clipped channel is a clipped file, whatever the others hold."""
    x = _channels(signal)
    return float(np.max(np.mean(np.abs(x) >= CLIP_LEVEL, axis=0))) if x.size else 0.0


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
                signals = [column[i].signal for i in pending]
                ratios = speech_ratios(self.vad, signals, self.cfg.audio_quality.sample_rate)
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
        rate = cfg.sample_rate
        raw, source_rate, num_samples = self._decode(row, cfg)
        bad = int(np.count_nonzero(~np.isfinite(raw)))
        if bad:  # NaN loudness would read as -120 LUFS, i.e. "too quiet"
            raise Reject("non_finite_samples", f"{bad} of {raw.size} samples are NaN or infinite: no defined level")
        channels = audio.resample_channels(raw, source_rate, rate)[:num_samples]
        return {
            "score_loudness": integrated_loudness(channels, rate),
            "score_silence_ratio": silence_ratio(channels, rate),
            "score_clipping_ratio": clipping_ratio(raw),  # before resampling, see the module docstring
            "score_speech_ratio": _PendingSpeech(channels.mean(axis=1, dtype=np.float32)),
        }

    @staticmethod
    def _decode(row: dict, cfg: AudioQualityConfig) -> tuple[np.ndarray, int, int]:
        """The file's own (frames, channels) samples, their rate, and how many samples at cfg.sample_rate they
        are scored on. The probed duration bounds the read (max_seconds when unknown); nothing is zero-padded."""
        duration = float(row.get("duration_s", 0.0) or 0.0)
        seconds = min(duration, cfg.max_seconds) if duration > 0 else cfg.max_seconds
        num_samples = max(1, round(seconds * cfg.sample_rate))
        try:
            return (*audio.read_audio(row["uri"], cfg.sample_rate, num_samples), num_samples)
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
