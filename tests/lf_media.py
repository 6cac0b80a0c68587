"""Helpers of the media tests (tests/datasets): a tone written with libsndfile, its peak frequency, and a probe
expected to fail for a given reason."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from latentforge.datasets.media import MediaError, probe


def write_tone(path: Path, rate: int, seconds: float, hz: float, channels: int = 1) -> None:
    t = np.arange(int(rate * seconds)) / rate
    tone = 0.5 * np.sin(2 * np.pi * hz * t)
    sf.write(str(path), np.stack([tone] * channels, axis=1), rate, subtype="PCM_16")


def peak_hz(signal: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(signal))
    return float(np.fft.rfftfreq(len(signal), 1 / rate)[spectrum.argmax()])


def expect_error(path: Path, reason: str, **kwargs) -> MediaError:
    with pytest.raises(MediaError) as info:
        probe(path, **kwargs)
    assert info.value.reason == reason, str(info.value)
    return info.value
