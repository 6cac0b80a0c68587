"""Inputs a real corpus holds beside the demo corpus's PNG / H.264 / WAV, through the Ray Data job: MP3, AAC in M4A,
Opus (in Ogg and in a WebM holding only sound) and AIFF audio at 44.1 / 48 kHz, a PNG with transparency, a 16-bit
grey PNG, and a phone's portrait video (landscape frames stored with a display rotation). Each is kept with the
latents its decoders give outside the job; an M4A cut short, and a file whose name is not UTF-8 (Latin-1), are
rejected with their reasons."""
from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile as sf
from lf_media import write_pyav_audio
from PIL import Image

from latentforge.datasets import audio, media, video
from latentforge.datasets import manifest as mf
from latentforge.datasets.codec import DctAudioCodec, HaarPixelCodec
from latentforge.datasets.shards import iter_shards
from latentforge.pipelines.config import CurationConfig
from latentforge.pipelines.curate import run_curation

pytestmark = pytest.mark.integration


def tone(rate: int, seconds: float = 1.5) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * 440 * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


STORED = np.zeros((32, 64, 3), np.uint8)  # landscape as stored: a white band on the left, a grey one on top
STORED[:, :16] = 255
STORED[:8] = 128


def write_portrait_video(path) -> None:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(90)
        for _ in range(16):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(STORED, format="rgb24")))
        out.mux(stream.encode())


def test_common_formats_are_curated_as_their_decoders_read_them(tmp_path, ray_local):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    sf.write(str(corpus / "song.mp3"), tone(44100), 44100, format="MP3")
    sf.write(str(corpus / "voice.opus"), tone(48000), 48000, format="OGG", subtype="OPUS")
    sf.write(str(corpus / "take.aiff"), tone(44100), 44100, format="AIFF")
    write_pyav_audio(corpus / "podcast.m4a", 1.5, 44100)
    write_pyav_audio(corpus / "talk.webm", 1.5, 48000, "libopus")  # a video container holding only sound
    write_pyav_audio(corpus / "cut.m4a", 1.5, 44100, movflags="faststart")
    (corpus / "cut.m4a").write_bytes((corpus / "cut.m4a").read_bytes()[:3000])
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[16:48, 16:48] = (255, 0, 0, 255)
    Image.fromarray(rgba, "RGBA").save(corpus / "logo.png")
    Image.fromarray(np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)).save(corpus / "scan16.png")
    write_portrait_video(corpus / "phone.mp4")
    Image.fromarray(rgba, "RGBA").save(corpus / os.fsdecode(b"caf\xe9.png"))  # a Latin-1 name: not UTF-8
    for path in list(corpus.iterdir()):
        path.with_suffix(".txt").write_text(f"a recording named {path.stem}", errors="surrogateescape")

    result = run_curation(CurationConfig(input_dir=corpus, samples_per_shard=4), tmp_path / "ds")

    ds = mf.Dataset(tmp_path / "ds")
    rows = {r["relpath"]: r for r in ds.manifest().to_pylist()}
    rejects = {r["relpath"]: r for r in ds.rejects().to_pylist()}
    names = {os.fsencode(p.name).decode("utf-8", "backslashreplace") for p in corpus.iterdir() if p.suffix != ".txt"}
    assert result.inputs == 10 and set(rows) | set(rejects) == names
    assert set(rejects) == {"cut.m4a", "caf\\xe9.png"} and rejects["cut.m4a"]["reason"] == "decode_error", rejects
    assert (rejects["caf\\xe9.png"]["reason"], rejects["caf\\xe9.png"]["stage"]) == ("undecodable_name", "discover")
    assert "not valid UTF-8" in rejects["caf\\xe9.png"]["message"] and not ds.card["orphan_captions"]
    assert {r["modality"] for name, r in rows.items() if name.endswith(("mp3", "opus", "aiff", "m4a", "webm"))} == {
        "audio"} and "talk.webm" in rows
    assert (rows["phone.mp4"]["width"], rows["phone.mp4"]["height"]) == (32, 64)  # upright: portrait

    samples = {s.key: s for s in iter_shards(sorted((tmp_path / "ds" / mf.SHARDS).glob("*.tar")))}
    rate, seconds = ds.card["config"]["audio_sample_rate"], ds.card["config"]["audio_seconds"]
    for name, row in rows.items():
        latent = samples[row["id"]].latent
        if row["modality"] == "audio":  # the DCT codec is exact: the latent is the decoded, resampled tone
            wave = DctAudioCodec().decode(latent)
            np.testing.assert_allclose(wave, audio.decode_audio(row["uri"], rate, int(rate * seconds)), atol=1e-5)
            spectrum = np.abs(np.fft.rfft(wave[: rate]))
            assert abs(np.fft.rfftfreq(rate, 1 / rate)[spectrum.argmax()] - 440) < 4, name
    size = (32, 32)
    logo = HaarPixelCodec().decode(samples[rows["logo.png"]["id"]].latent)[0]
    assert tuple(logo[0, 0]) == (255, 255, 255) and tuple(logo[16, 16]) == (255, 0, 0)  # transparent -> white
    scan = HaarPixelCodec().decode(samples[rows["scan16.png"]["id"]].latent)[0]
    assert 100 < scan.mean() < 155 and scan.min() < 20  # the ramp's tones, not clipped white
    phone = HaarPixelCodec().decode(samples[rows["phone.mp4"]["id"]].latent)
    np.testing.assert_array_equal(phone, video.decode_video(rows["phone.mp4"]["uri"], len(phone), size)[0])
    upright, sideways = media.resize_crop(np.rot90(STORED).copy(), size), media.resize_crop(STORED, size)
    assert np.abs(phone[0].astype(int) - upright).mean() < 8 < np.abs(phone[0].astype(int) - sideways).mean()
