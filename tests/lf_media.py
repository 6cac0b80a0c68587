"""Helpers of the media tests: a tone written with libsndfile or with FFmpeg (PyAV), its peak frequency, and a probe
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


def write_pyav_audio(path: Path, seconds: float, rate: int, codec: str = "aac", channels: int = 1,
                     fmt: str | None = None, **options: str) -> None:
    """A 440 Hz tone at half scale, encoded by FFmpeg through PyAV (AAC, Opus, FLAC, ...) in the container the name
    (or `fmt`, e.g. "adts") says; `options` go to the muxer (`movflags="faststart"`: an MPEG-4 index first)."""
    import av

    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(int(rate * seconds)) / rate)).astype(np.float32)
    layout, step = ("stereo" if channels == 2 else "mono"), (960 if codec == "libopus" else 1024)
    with av.open(str(path), "w", format=fmt, options=options) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        for start in range(0, len(tone), step):
            frame = av.AudioFrame.from_ndarray(np.stack([tone[start:start + step]] * channels), format="fltp",
                                               layout=layout)
            frame.sample_rate, frame.pts = rate, start
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
