"""FilterAudioQuality on multi-channel, non-finite and very short files: real WAV/FLAC, soundfile, Silero ONNX.

Clipping and loudness are properties of the channels as recorded, so a mono mix hides a clipped channel, drops
out-of-phase content and understates the level of stereo by 3 dB; these tests pin the scores to the channels.
"""
from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf
from lf_batches import by_relpath, to_batch

from latentforge.datasets import audio
from latentforge.pipelines.config import CurationConfig
from latentforge.pipelines.discover import discover
from latentforge.pipelines.stages.filter_audio import CLIP_LEVEL, AudioQualityConfig, FilterAudioQuality
from latentforge.pipelines.stages.probe_media import ProbeMedia

RATE = 16000


def tone(seconds: float, amplitude: float = 0.5, rate: int = RATE, hz: float = 440.0) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate)


def clipped_sine(seconds: float, rate: int = RATE) -> np.ndarray:
    """A sine driven 3x past full scale: about 78% of its samples sit at +-1."""
    return np.clip(3 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * rate)) / rate), -1, 1)


def files() -> dict[str, tuple[np.ndarray, int, str]]:
    """name -> (samples (frames,) or (frames, channels), rate, soundfile subtype)."""
    noise = np.random.default_rng(0).normal(0, 0.2, 2 * RATE)
    quiet = tone(2.0, amplitude=10 ** (-46 / 20) * np.sqrt(2))  # RMS -46 dBFS: above the -50 dBFS floor
    with_nan = tone(2.0).astype(np.float32)
    with_nan[1000] = np.nan
    surround = np.zeros((2 * RATE, 6))
    surround[:, 0] = tone(2.0)  # 5.1 in WAV order: L R C LFE Ls Rs
    return {
        "mono_tone.wav": (tone(2.0), RATE, "FLOAT"),
        "stereo_same.wav": (np.stack([tone(2.0), tone(2.0)], axis=1), RATE, "FLOAT"),
        "stereo_antiphase.wav": (np.stack([noise, -noise], axis=1), RATE, "PCM_16"),
        "left_clipped.wav": (np.stack([clipped_sine(2.0), np.zeros(2 * RATE)], axis=1), RATE, "PCM_16"),
        "left_clipped_44k.flac": (np.stack([clipped_sine(2.0, 44100), np.zeros(88200)], axis=1), 44100, "PCM_16"),
        "left_quiet.wav": (np.stack([quiet, np.zeros_like(quiet)], axis=1), RATE, "PCM_16"),
        "one_nan.wav": (with_nan, RATE, "FLOAT"),
        "short_5ms.wav": (tone(0.005), RATE, "FLOAT"),
        "surround_left.wav": (surround, RATE, "FLOAT"),
    }


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("channels")
    for name, (samples, rate, subtype) in files().items():
        sf.write(str(root / name), samples, rate, subtype=subtype)
    return root


@pytest.fixture(scope="module")
def rows(root: Path) -> dict[str, dict]:
    """Default thresholds, as curation runs them."""
    cfg = types.SimpleNamespace(audio_quality=AudioQualityConfig(), decode_timeout_s=30.0)
    batch = ProbeMedia(CurationConfig())(to_batch(discover(root, samples_per_shard=64)))
    return by_relpath(FilterAudioQuality(cfg)(batch))


def bs1770(path: Path) -> float:
    """pyloudnorm on every channel of the file as written (all test files are at RATE, so no resampling)."""
    samples, rate = sf.read(str(path), dtype="float64", always_2d=True)
    return pyloudnorm.Meter(rate).integrated_loudness(samples)


@pytest.mark.parametrize("name", ["left_clipped.wav", "left_clipped_44k.flac"])
def test_one_clipped_channel_sets_the_clipping_ratio(root: Path, rows: dict, name: str) -> None:
    """Averaging a clipped channel with a quiet one halves it below the clip level: the mix shows no clipping."""
    left = sf.read(str(root / name), dtype="float32")[0][:, 0]
    clipped = float(np.mean(np.abs(left) >= CLIP_LEVEL))
    assert clipped > 0.7
    assert rows[name]["score_clipping_ratio"] == pytest.approx(clipped, abs=0.01)
    assert rows[name]["status"] == "ok"


def test_stereo_loudness_is_bs1770_over_both_channels(root: Path, rows: dict) -> None:
    """Two identical channels are 3 dB louder than one (channel powers add); the mono mix scored them as one."""
    stereo, mono = rows["stereo_same.wav"]["score_loudness"], rows["mono_tone.wav"]["score_loudness"]
    assert stereo == pytest.approx(bs1770(root / "stereo_same.wav"), abs=0.1)
    assert stereo - mono == pytest.approx(10 * np.log10(2), abs=0.1)


def test_out_of_phase_stereo_is_neither_quiet_nor_silent(root: Path, rows: dict) -> None:
    """R = -L cancels in a mono mix to digital silence; per channel it is loud noise and must pass."""
    row = rows["stereo_antiphase.wav"]
    assert row["score_loudness"] == pytest.approx(bs1770(root / "stereo_antiphase.wav"), abs=0.1)
    assert row["score_loudness"] > -20
    assert row["score_silence_ratio"] == 0.0
    assert (row["status"], row["reason"]) == ("ok", "")


def test_a_frame_is_silent_only_when_every_channel_is(rows: dict) -> None:
    """Left at -46 dBFS RMS is above the -50 dBFS floor; mixed with a silent right it would drop to -52."""
    assert rows["left_quiet.wav"]["score_silence_ratio"] == 0.0


def test_surround_loudness_skips_lfe_and_weights_front_channels_as_mono(rows: dict) -> None:
    """A tone on the left of a 5.1 file measures as the same tone in mono; a six-channel mix divided it by six."""
    assert rows["surround_left.wav"]["status"] == "ok"
    assert rows["surround_left.wav"]["score_loudness"] == pytest.approx(rows["mono_tone.wav"]["score_loudness"],
                                                                        abs=0.1)


def test_a_non_finite_sample_rejects_the_row_with_its_own_reason(rows: dict) -> None:
    """One NaN makes the loudness NaN; the row must not read as `loudness_below_min` ("too quiet")."""
    row = rows["one_nan.wav"]
    assert (row["status"], row["reason"], row["stage"]) == ("rejected", "non_finite_samples", "filter_audio")
    assert "NaN" in row["message"]


def test_a_clip_shorter_than_one_frame_is_measured_on_what_it_has(rows: dict) -> None:
    """A loud 5 ms tone holds no whole 20 ms frame and a 80th of a 400 ms block: neither silent nor quiet."""
    short, full = rows["short_5ms.wav"], rows["mono_tone.wav"]
    assert short["score_silence_ratio"] == 0.0
    assert short["score_loudness"] == pytest.approx(full["score_loudness"], abs=1.0)
    assert (short["status"], short["reason"]) == ("ok", "")


def test_read_audio_returns_the_channels_as_recorded(root: Path) -> None:
    """Raw frames at the file's own rate, unmixed; decode_audio stays the mono mix it was."""
    raw, rate = audio.read_audio(root / "left_clipped_44k.flac", RATE, RATE)
    assert rate == 44100 and raw.dtype == np.float32 and raw.ndim == 2 and raw.shape[1] == 2
    assert raw.shape[0] >= 44100 and np.abs(raw[:, 0]).max() == pytest.approx(1.0, abs=1e-3)
    assert not raw[:, 1].any()
    mono = audio.decode_audio(root / "stereo_same.wav", RATE, RATE)
    assert mono.shape == (RATE,) and np.abs(mono).max() == pytest.approx(0.5, abs=1e-3)
