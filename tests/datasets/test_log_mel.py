"""Log-mel latents: shapes, the filterbank, and a Griffin-Lim decode that keeps a tone's pitch and loudness."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from latentforge.datasets.encoders import build_audio_encoder
from latentforge.datasets.encoders.config import LogMelConfig
from latentforge.datasets.encoders.log_mel import LogMelEncoder, hz_to_mel, mel_filterbank, mel_to_hz

SR = 16000


@pytest.fixture(scope="module")
def enc():
    return build_audio_encoder(LogMelConfig(kind="log_mel"), SR)


def tone(freq: float, n: int = 8192, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(n) / SR)).astype(np.float32)


def test_filterbank():
    fb = mel_filterbank(SR, 512, 64)
    assert fb.shape == (64, 257) and fb.min() >= 0 and fb.max() <= 1.0
    assert fb.max(axis=1).min() > 0.5  # no filter falls between FFT bins
    assert np.all(fb.sum(axis=0)[1:-1] > 0)  # every bin between DC and Nyquist is covered
    np.testing.assert_allclose(mel_to_hz(hz_to_mel([0.0, 700.0, 8000.0])), [0.0, 700.0, 8000.0], atol=1e-6)
    assert np.isclose(hz_to_mel(1000.0), 1000.0, atol=0.1)  # the HTK scale's anchor


def test_shapes_and_describe(enc):
    assert isinstance(enc, LogMelEncoder)
    waves = np.stack([tone(440.0, 1024), tone(880.0, 1024)])
    z = enc.encode(waves)
    assert z.shape == (2, 64, 1024 // 128, 1, 1) and z.dtype == np.float32
    assert np.isfinite(z).all() and z.min() >= np.log(1e-5) - 1e-6
    np.testing.assert_array_equal(z, enc.encode(waves))
    d = enc.describe()
    assert {"kind", "model", "revision", "config_hash", "channels", "sample_rate", "hop", "scale", "shift",
            "dtype"} <= d.keys()
    assert (d["kind"], d["channels"], d["hop"], d["sample_rate"], d["mel_scale"]) == ("log_mel", 64, 128, SR, "htk")
    json.dumps(d)
    other = LogMelEncoder(LogMelConfig(kind="log_mel", n_mels=32), SR).describe()["config_hash"]
    assert other != d["config_hash"]


def test_rejects_bad_input(enc):
    with pytest.raises(ValueError):
        enc.encode(np.zeros((1, 1000), np.float32))  # not a multiple of hop
    with pytest.raises(ValueError):
        enc.decode(np.zeros((1, 32, 4, 1, 1), np.float32))
    with pytest.raises(ValueError):
        LogMelEncoder(LogMelConfig(kind="log_mel", n_fft=256, hop=200), SR)


@pytest.mark.parametrize("freq", [440.0, 1000.0])
def test_decode_keeps_pitch_and_loudness(enc, freq):
    x = tone(freq)[None]
    y = enc.decode(enc.encode(x))
    assert y.shape == x.shape and y.dtype == np.float32
    peak = np.argmax(np.abs(np.fft.rfft(y[0]))) * SR / y.shape[1]
    assert abs(peak - freq) <= SR / 512  # within one STFT bin
    rms_ratio = np.sqrt(np.mean(y ** 2)) / np.sqrt(np.mean(x ** 2))
    assert 0.7 < rms_ratio < 1.4
    np.testing.assert_array_equal(y, enc.decode(enc.encode(x)))  # Griffin-Lim starts from a fixed phase
