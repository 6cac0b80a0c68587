"""Audio probing and decoding (latentforge.datasets.audio) on real files written by libsndfile and FFmpeg."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from lf_media import expect_error, peak_hz, write_pyav_audio, write_tone

from latentforge.datasets.audio import decode_audio
from latentforge.datasets.demo_corpus import encode_video
from latentforge.datasets.media import probe, sniff_modality

def test_audio_probe_and_decode_resamples_to_mono(tmp_path: Path) -> None:
    path = tmp_path / "tone.wav"
    write_tone(path, 22050, 0.5, 440, channels=2)
    result = probe(path)
    assert (result.modality, result.sample_rate, result.channels, result.num_frames) == ("audio", 22050, 2, 11025)
    assert result.duration_s == pytest.approx(0.5)
    samples = decode_audio(path, 16000, 16000)
    assert samples.shape == (16000,) and samples.dtype == np.float32
    assert peak_hz(samples[:8000], 16000) == pytest.approx(440, abs=4)
    assert np.abs(samples[:8000]).max() == pytest.approx(0.5, abs=0.02)
    assert not samples[8010:].any()  # zero-padded past the half second of audio


def test_audio_resampling_filters_what_the_target_rate_cannot_hold(tmp_path: Path) -> None:
    """Down to 8 kHz, a 7 kHz tone is above the new Nyquist (4 kHz): filtered out, not folded back in as a 1 kHz
    tone (linear interpolation kept it at 92% of its level); a 1 kHz tone keeps its level to the last sample
    of a span cut from a longer file (the read reaches past the span for the filter)."""
    write_tone(tmp_path / "high.wav", 44100, 1.0, 7000)
    high = decode_audio(tmp_path / "high.wav", 8000, 8000)
    assert np.sqrt(np.mean(high[200:-200] ** 2)) < 0.005  # the input's RMS is 0.35
    write_tone(tmp_path / "low.wav", 44100, 1.0, 1000)
    low = decode_audio(tmp_path / "low.wav", 8000, 4000)  # the first half second of the second
    assert peak_hz(low, 8000) == pytest.approx(1000, abs=4)
    assert np.abs(low[100:]).max() == pytest.approx(0.5, abs=0.01)
    expected = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(4000) / 8000)
    assert np.abs(low - expected)[100:].max() < 0.002  # to the last sample: no fade into padding at the cut
    write_tone(tmp_path / "odd.wav", 44101, 0.5, 440)  # coprime rates: the ratio approximated, not 44101 taps
    odd = decode_audio(tmp_path / "odd.wav", 16000, 8000)
    assert peak_hz(odd, 16000) == pytest.approx(440, abs=4)
    assert np.abs(odd[100:-100]).max() == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("name, rate, kind", [("tone.mp3", 22050, {"format": "MP3"}),
                                               ("tone.opus", 48000, {"format": "OGG", "subtype": "OPUS"}),
                                               ("tone.aiff", 22050, {"format": "AIFF"})])
def test_mp3_opus_and_aiff_are_audio_inputs(tmp_path: Path, name: str, rate: int, kind: dict) -> None:
    """Written by libsndfile (the decoder curation reads them with); an MP3's frames start with MPEG's sync word."""
    path = tmp_path / name
    sf.write(str(path), 0.5 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate), rate, **kind)
    result = probe(path)
    assert (result.modality, result.sample_rate) == ("audio", rate) and result.duration_s == pytest.approx(1, abs=0.1)
    samples = decode_audio(path, 16000, 16000)
    assert peak_hz(samples, 16000) == pytest.approx(440, abs=4) and np.abs(samples[4000:12000]).max() > 0.4
    assert sniff_modality(path) == "audio"


@pytest.mark.parametrize("name, kind", [("cut.mp3", "MP3"), ("cut.flac", "FLAC")])
def test_an_audio_file_cut_short_is_rejected(tmp_path: Path, name: str, kind: str) -> None:
    """Its header still counts every sample (WAV and AIFF count what is there): the probe decodes the end too."""
    path = tmp_path / name
    sf.write(str(path), 0.5 * np.sin(2 * np.pi * 440 * np.arange(66150) / 22050), 22050, format=kind)
    assert probe(path).num_frames == 66150
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert sf.info(str(path)).frames == 66150  # what the header still says
    error = str(expect_error(path, "decode_error"))
    assert "truncated" in error if kind == "MP3" else "could not decode cut.flac" in error  # libsndfile's seek fails


@pytest.mark.parametrize("name, fmt", [("tone.m4a", None), ("tone.aac", "adts")])
def test_aac_in_m4a_and_adts_decodes_through_pyav(tmp_path: Path, name: str, fmt: str | None) -> None:
    """libsndfile has no AAC decoder; FFmpeg (PyAV) reads these, with the same probe fields and decode semantics."""
    path = tmp_path / name
    write_pyav_audio(path, 3.0, 44100, channels=2, fmt=fmt)
    assert sniff_modality(path) == "audio"
    result = probe(path)
    assert (result.modality, result.sample_rate, result.channels, result.decoder) == ("audio", 44100, 2, "pyav")
    assert result.duration_s == pytest.approx(3.0, abs=0.1)
    samples = decode_audio(path, 16000, 16000)
    assert peak_hz(samples, 16000) == pytest.approx(440, abs=4) and np.abs(samples[4000:]).max() > 0.4
    assert decode_audio(path, 16000, 80000)[60000:].any() == False  # noqa: E712 - past its 3 s: zero-padded


def test_an_m4a_cut_short_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "cut.m4a"
    write_pyav_audio(path, 3.0, 44100, channels=2)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # its index (written last) goes too
    assert "pyav could not decode cut.m4a" in str(expect_error(path, "decode_error"))
    write_pyav_audio(path, 3.0, 44100, channels=2, movflags="faststart")  # index first: opens, header counts all
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "cut.m4a has nothing to decode in its last second, of the 3.0" in str(expect_error(path, "decode_error"))
    video_named = tmp_path / "song.m4a"
    encode_video(video_named, np.zeros((4, 16, 16, 3), np.uint8), 8)
    assert "extension .m4a says audio but content is an MP4/QuickTime video" in str(
        expect_error(video_named, "extension_mismatch"))


def test_audio_decode_cuts(tmp_path: Path) -> None:
    path = tmp_path / "tone.flac"
    write_tone(path, 16000, 1.0, 220)
    assert decode_audio(path, 16000, 100).shape == (100,)



@pytest.mark.parametrize("name, codec", [("podcast.webm", "libopus"), ("soundtrack.mp4", "aac"),
                                         ("session.mkv", "flac")])
def test_a_video_container_holding_only_sound_is_audio(tmp_path: Path, name: str, codec: str) -> None:
    """What an audio download often is (YouTube's best audio is Opus in WebM): probed and decoded as audio,
    through PyAV, not rejected for lacking a video stream."""
    path, rate = tmp_path / name, 48000
    write_pyav_audio(path, 2.0, rate, codec)
    result = probe(path)
    assert (result.modality, result.decoder, result.sample_rate) == ("audio", "pyav", rate)
    assert result.duration_s == pytest.approx(2.0, abs=0.05)
    samples = decode_audio(path, 16000, 16000)
    assert peak_hz(samples, 16000) == pytest.approx(440, abs=4) and np.abs(samples[4000:]).max() > 0.4
