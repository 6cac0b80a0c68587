"""FilterAudioQuality on real WAV files: tone, silence, clipped square, noise, a synthetic voice; real Silero ONNX."""
from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from lf_batches import by_relpath, to_batch
from pydantic import ValidationError
from scipy.signal import lfilter

from latentforge.datasets.demo_corpus import DemoCorpusSpec, generate_demo_corpus
from latentforge.pipelines.config import CurationConfig
from latentforge.pipelines.discover import discover
from latentforge.pipelines.stages.filter_audio import (
    LOUDNESS_FLOOR_LUFS,
    AudioQualityConfig,
    FilterAudioQuality,
    load_silero_vad,
    silero_model_path,
    speech_ratio,
    speech_ratios,
)
from latentforge.pipelines.stages.probe_media import ProbeMedia

RATE = 16000
# (F1, F2, F3) formants of seven vowels, Hz.
VOWELS = ((730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410),
          (400, 2000, 2550), (660, 1720, 2410))


def resonate(signal: np.ndarray, frequency: float, bandwidth: float) -> np.ndarray:
    r = np.exp(-np.pi * bandwidth / RATE)
    return lfilter([1 - r], [1, -2 * r * np.cos(2 * np.pi * frequency / RATE), r * r], signal)


def syllable(rng: np.random.Generator, f0: float) -> np.ndarray:
    """A 150-300 ms gliding vowel (pulse train at `f0` through formants), after a fricative half the time."""
    length = int(rng.uniform(0.15, 0.3) * RATE)
    t = np.arange(length) / RATE
    phase = np.cumsum(f0 * (1 + 0.15 * rng.choice([-1, 1]) * np.sin(np.pi * t / t[-1])) / RATE)
    source = (np.diff(np.floor(phase), prepend=0) > 0) + 0.01 * rng.standard_normal(length)
    start, end = VOWELS[rng.integers(len(VOWELS))], VOWELS[rng.integers(len(VOWELS))]
    vowel, half = np.zeros(length), length // 2
    for f_start, f_end, bandwidth in zip(start, end, (90, 110, 150), strict=True):
        vowel[:half] += resonate(source, f_start, bandwidth)[:half]
        vowel[half:] += resonate(source, f_end, bandwidth)[half:]
    vowel *= np.sin(np.pi * np.arange(length) / length) ** 0.7 / np.abs(vowel).max()
    if rng.random() >= 0.5:
        return vowel
    hiss = resonate(rng.standard_normal(int(0.06 * RATE)), rng.uniform(3500, 6000), 1500)
    return np.concatenate([0.3 * hiss / np.abs(hiss).max() * np.hanning(len(hiss)), vowel])


def synthetic_voice(seconds: float, seed: int = 0) -> np.ndarray:
    """Crude speech Silero recognises (>0.85 of windows over 20 seeds): syllables with drifting pitch."""
    rng = np.random.default_rng(seed)
    parts, f0, total = [], 130.0, int(seconds * RATE)
    while sum(map(len, parts)) < total:
        parts.append(syllable(rng, f0))
        f0 *= rng.uniform(0.95, 1.03)
    voice = np.concatenate(parts)[:total]
    return 0.3 * voice / np.abs(voice).max()


def signals() -> dict[str, tuple[np.ndarray, int]]:
    t = np.arange(2 * RATE) / RATE
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    return {
        "tone.wav": (tone, RATE),
        "silence.wav": (np.zeros_like(t), RATE),
        "square.wav": (np.sign(np.sin(2 * np.pi * 440 * t)), RATE),  # full scale: every sample clipped
        "noise.wav": (np.random.default_rng(0).uniform(-0.5, 0.5, len(t)), RATE),
        "mostly_silent.wav": (np.where(t < 0.6, tone, 0.0), RATE),  # 70% digital silence
        "voice.wav": (synthetic_voice(3.0), RATE),
        "tone_44k.flac": (0.5 * np.sin(2 * np.pi * 440 * np.arange(44100) / 44100), 44100),  # resampled
        "short.wav": (tone[:3000], RATE),  # shorter than one 400 ms loudness block
    }


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    root = tmp_path_factory.mktemp("audio")
    generate_demo_corpus(root, DemoCorpusSpec(num_images=1, num_videos=1, num_audio=1, include_broken=False))
    for name, (signal, rate) in signals().items():
        sf.write(str(root / name), signal, rate, subtype="PCM_16")
    return ProbeMedia(CurationConfig())(to_batch(discover(root, samples_per_shard=64)))


@pytest.fixture(scope="module")
def stage() -> FilterAudioQuality:
    """Silero loads once for the module; thresholds are swapped per test on the same session."""
    return FilterAudioQuality(types.SimpleNamespace(audio_quality=AudioQualityConfig(), decode_timeout_s=30.0))


def run(stage: FilterAudioQuality, batch: dict[str, np.ndarray], **settings) -> dict[str, dict]:
    stage.cfg = types.SimpleNamespace(audio_quality=AudioQualityConfig(**settings), decode_timeout_s=30.0)
    return by_relpath(stage({k: v.copy() for k, v in batch.items()}))


@pytest.fixture(scope="module")
def scored(stage, probed: dict) -> dict[str, dict]:
    return run(stage, probed, min_loudness_lufs=-200.0)


def test_loudness_orders_square_tone_and_silence(scored: dict) -> None:
    loud = {name: scored[name]["score_loudness"] for name in ("square.wav", "tone.wav", "noise.wav", "silence.wav")}
    assert loud["square.wav"] > loud["tone.wav"] > loud["silence.wav"] == LOUDNESS_FLOOR_LUFS
    assert loud["square.wav"] > loud["noise.wav"] > loud["silence.wav"]
    assert -12 < loud["tone.wav"] < -8  # a 440 Hz sine at half scale is about -9.8 LUFS
    assert scored["tone_44k.flac"]["score_loudness"] == pytest.approx(loud["tone.wav"], abs=0.5)
    assert -20 < scored["short.wav"]["score_loudness"] < -8


def test_silence_and_clipping_ratios(scored: dict) -> None:
    assert scored["silence.wav"]["score_silence_ratio"] == 1.0
    assert scored["mostly_silent.wav"]["score_silence_ratio"] == pytest.approx(0.7, abs=0.02)
    assert scored["square.wav"]["score_clipping_ratio"] > 0.99
    for name in ("tone.wav", "noise.wav", "square.wav", "voice.wav"):
        assert scored[name]["score_silence_ratio"] < 0.05, name
    for name in ("tone.wav", "noise.wav", "silence.wav", "voice.wav"):
        assert scored[name]["score_clipping_ratio"] == 0.0, name


def test_silero_scores_a_synthetic_voice_above_tones_and_noise(scored: dict) -> None:
    ratios = {name: row["score_speech_ratio"] for name, row in scored.items() if row["modality"] == "audio"}
    assert all(0.0 <= r <= 1.0 for r in ratios.values())
    assert ratios["voice.wav"] > 0.5
    for name in ("tone.wav", "silence.wav", "square.wav", "noise.wav"):
        assert ratios[name] < 0.2, name


def test_silero_runs_from_the_wheel_without_torch_at_both_rates() -> None:
    assert silero_model_path().is_file()
    session = load_silero_vad()
    voice = synthetic_voice(1.0, seed=3)
    assert 0.5 < speech_ratio(session, voice.astype(np.float32), 16000) <= 1.0
    assert 0.5 < speech_ratio(session, voice[::2].astype(np.float32), 8000) <= 1.0  # 256-sample windows
    assert speech_ratio(session, np.zeros(100, np.float32), 16000) == 0.0  # shorter than one window


def test_default_thresholds_filter_only_digital_silence(stage, probed: dict) -> None:
    rows = run(stage, probed)
    silence = rows["silence.wav"]
    assert (silence["status"], silence["reason"], silence["stage"]) == ("filtered", "loudness_below_min",
                                                                        "filter_audio")
    assert "LUFS" in silence["message"]
    assert all(r["status"] == "ok" for name, r in rows.items() if r["modality"] == "audio" and name != "silence.wav")


@pytest.mark.parametrize(("settings", "name", "reason"), [
    ({"max_silence_ratio": 0.5}, "mostly_silent.wav", "silence_above_max"),
    ({"max_clipping_ratio": 0.01}, "square.wav", "clipping_above_max"),
    ({"min_speech_ratio": 0.5}, "tone.wav", "speech_below_min"),
])
def test_thresholds_filter_with_the_right_reason(stage, probed: dict, settings: dict, name: str, reason: str) -> None:
    rows = run(stage, probed, **settings)
    assert (rows[name]["status"], rows[name]["reason"]) == ("filtered", reason)
    assert rows["voice.wav"]["status"] == "ok"


def test_visual_rows_pass_through_with_default_scores(scored: dict) -> None:
    visual = [r for r in scored.values() if r["modality"] in ("image", "video")]
    assert visual and all(r["status"] == "ok" for r in visual)
    assert all(r[k] == 0.0 for r in visual for k in FilterAudioQuality.outputs)


def test_an_undecodable_file_is_rejected_with_the_media_reason(stage, tmp_path: Path) -> None:
    broken = tmp_path / "text.flac"
    broken.write_bytes(b"this is not FLAC audio\n")
    row = {"id": "s1", "uri": str(broken), "relpath": "text.flac", "status": "ok", "reason": "", "message": "",
           "stage": "", "modality": "audio", "duration_s": 1.0}
    out = run(stage, to_batch([row]))["text.flac"]
    assert (out["status"], out["reason"], out["stage"]) == ("rejected", "decode_error", "filter_audio")


def test_config_forbids_unknown_keys_and_unsupported_rates() -> None:
    with pytest.raises(ValidationError):
        AudioQualityConfig(min_loudness=-30.0)
    with pytest.raises(ValidationError):
        AudioQualityConfig(sample_rate=44100)


def test_batched_vad_gives_each_clip_its_own_ratio() -> None:
    """One batched pass over clips of different lengths (one shorter than a window) equals one clip at a time,
    at both rates: each batch row carries its own state and context."""
    session = load_silero_vad()
    rng = np.random.default_rng(0)
    clips = [synthetic_voice(1.3, seed=1), 0.2 * rng.standard_normal(RATE).astype(np.float32),
             np.zeros(100, np.float32), synthetic_voice(0.7, seed=2), 0.5 * np.sin(np.arange(9000) / 10.0)]
    clips = [c.astype(np.float32) for c in clips]
    for rate, step in ((16000, 1), (8000, 2)):
        alone = [speech_ratio(session, c[::step], rate) for c in clips]
        together = speech_ratios(session, [c[::step] for c in clips], rate)
        assert together == alone
        assert together[2] == 0.0 and together[0] > 0.5 > together[1]
    assert speech_ratios(session, [], 16000) == []


def test_a_failed_vad_pass_rejects_its_rows_and_keeps_the_rest(stage, probed: dict) -> None:
    class Broken:  # an onnxruntime session whose run raises, as a corrupt model would
        def run(self, *args, **kwargs):
            raise RuntimeError("vad exploded")

    vad, stage.vad = stage.vad, Broken()
    try:
        rows = run(stage, probed)
    finally:
        stage.vad = vad
    audio = {name: r for name, r in rows.items() if r["modality"] == "audio" and name in ("voice.wav", "tone.wav")}
    assert audio and all((r["status"], r["reason"], r["stage"]) == ("rejected", "stage_error", "filter_audio")
                         for r in audio.values())
    assert all("vad exploded" in r["message"] for r in audio.values())
    assert all(r["status"] == "ok" for r in rows.values() if r["modality"] in ("image", "video"))
