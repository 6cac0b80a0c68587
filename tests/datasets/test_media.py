"""Probing and decoding against real files and real decoders (PIL, decord, PyAV, soundfile)."""

from __future__ import annotations

import copy
import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from lf_media import expect_error, write_tone
from PIL import Image

from latentforge.datasets import media, video
from latentforge.datasets.audio import decode_audio
from latentforge.datasets.demo_corpus import encode_video
from latentforge.datasets.media import (
    MediaError,
    decode_image,
    modality_from_extension,
    probe,
    resize_crop,
    sniff_modality,
)
from latentforge.datasets.video import decode_video

VIDEO_FRAMES, VIDEO_FPS, VIDEO_H, VIDEO_W = 12, 8, 32, 64


def gray_video_frames(width: int = VIDEO_W) -> np.ndarray:
    """Frame t is flat gray 20*t, so a decoded frame tells which source frame it came from."""
    levels = 20 * np.arange(VIDEO_FRAMES, dtype=np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (VIDEO_FRAMES, VIDEO_H, width, 3)).copy()


@pytest.fixture
def video_path(tmp_path: Path) -> Path:
    path = tmp_path / "clip.mp4"
    encode_video(path, gray_video_frames(), VIDEO_FPS)
    return path


@pytest.fixture
def png_path(tmp_path: Path) -> Path:
    """30x40 (H, W): red left half, blue right half."""
    pixels = np.zeros((30, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    path = tmp_path / "halves.png"
    Image.fromarray(pixels).save(path)
    return path


# ---------------------------------------------------------------- classification


def test_modality_from_extension() -> None:
    assert modality_from_extension("a/b.PNG") == "image"
    assert modality_from_extension("clip.webm") == "video"
    assert modality_from_extension(Path("x.flac")) == "audio"
    assert modality_from_extension("notes.txt") is None
    assert modality_from_extension("no_suffix") is None


def _write_sample(path: Path) -> None:
    suffix = path.suffix
    if suffix in {".png", ".jpg", ".webp", ".bmp", ".gif"}:
        Image.new("RGB", (8, 8), (10, 200, 30)).save(path)
    elif suffix == ".ogg":
        sf.write(str(path), np.zeros(1600, dtype=np.float32), 16000, format="OGG", subtype="VORBIS")
    elif suffix in {".wav", ".flac"}:
        write_tone(path, 16000, 0.1, 440)
    else:
        encode_video(path, gray_video_frames()[:2], VIDEO_FPS)


@pytest.mark.parametrize(
    ("name", "modality"),
    [
        ("a.png", "image"),
        ("a.jpg", "image"),
        ("a.webp", "image"),
        ("a.bmp", "image"),
        ("a.gif", "image"),
        ("a.mp4", "video"),
        ("a.mkv", "video"),
        ("a.wav", "audio"),
        ("a.flac", "audio"),
        ("a.ogg", "audio"),
    ],
)
def test_sniff_modality_recognises_real_files(tmp_path: Path, name: str, modality: str) -> None:
    path = tmp_path / name
    _write_sample(path)
    assert sniff_modality(path) == modality


def test_sniff_modality_unknown_content(tmp_path: Path) -> None:
    text = tmp_path / "notes.bin"
    text.write_bytes(b"BMW and other words, but not a bitmap header")
    assert sniff_modality(text) is None
    text.write_bytes("UTF-16 text starts FF FE, as MPEG audio's sync word might".encode("utf-16"))
    assert sniff_modality(text) is None
    text.write_bytes(b"\xff\xfb\x90\x64" + bytes(28))  # an MPEG-1 Layer III frame header
    assert sniff_modality(text) == "audio"


# ---------------------------------------------------------------- images


def test_png_probe_and_decode(png_path: Path) -> None:
    result = probe(png_path)
    assert (result.modality, result.width, result.height, result.decoder) == ("image", 40, 30, "pil")
    pixels = decode_image(png_path, (16, 16))
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
    # The centre crop keeps both halves: red on the left, blue on the right.
    assert tuple(pixels[8, 1]) == (255, 0, 0)
    assert tuple(pixels[8, 14]) == (0, 0, 255)


def test_jpeg_decode_is_close_and_writable(tmp_path: Path) -> None:
    path = tmp_path / "flat.jpg"
    Image.new("RGB", (64, 48), (200, 100, 50)).save(path, quality=95)
    assert probe(path).width == 64
    pixels = decode_image(path, (48, 64))
    assert np.abs(pixels.astype(int) - (200, 100, 50)).max() <= 4
    pixels[0, 0] = 0  # callers normalise in place


def test_a_16_bit_grey_png_keeps_its_tones(tmp_path: Path) -> None:
    """PIL's convert("RGB") clips 16-bit values at 255: this ramp came out all but white (mean 254.5)."""
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    assert Image.open(tmp_path / "ramp16.png").mode.startswith("I")
    pixels = decode_image(tmp_path / "ramp16.png", (64, 64))
    assert pixels.min() == 0 and pixels.max() == 255 and abs(pixels.mean() - 127.5) < 1
    assert (pixels[..., 0] == pixels[..., 1]).all() and (np.diff(pixels[:, :, 0].ravel().astype(int)) >= 0).all()


def test_transparent_pixels_decode_as_white(tmp_path: Path) -> None:
    """An alpha channel, a grey+alpha image and a palette entry marked transparent: composited over white, not
    the colour stored under the transparent pixels (black here, what a plain convert("RGB") gave)."""
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[16:48, 16:48] = (255, 0, 0, 255)
    rgba[:8, :8] = (0, 0, 255, 128)  # half transparent blue over white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    grey = np.zeros((64, 64, 2), np.uint8)
    grey[16:48, 16:48] = (200, 255)
    Image.fromarray(grey, "LA").save(tmp_path / "la.png")
    palette = Image.new("P", (64, 64), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (16, 16, 48, 48))
    palette.save(tmp_path / "p.png", transparency=0)
    for name, inside in (("rgba.png", (255, 0, 0)), ("la.png", (200, 200, 200)), ("p.png", (255, 0, 0))):
        pixels = decode_image(tmp_path / name, (64, 64))
        assert tuple(pixels[60, 60]) == (255, 255, 255) and tuple(pixels[32, 32]) == inside, name
    assert tuple(decode_image(tmp_path / "rgba.png", (64, 64))[2, 2]) == pytest.approx((127, 127, 255), abs=2)


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    Image.new("RGB", (40, 20), (0, 255, 0)).save(path, exif=exif)
    result = probe(path)
    assert (result.width, result.height) == (20, 40)


def test_a_probe_asked_for_a_thumbnail_decodes_a_jpeg_at_a_reduced_scale(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated: 200 wide, 400 tall
    Image.new("RGB", (400, 200), (10, 200, 30)).save(path, quality=95, exif=exif)
    result = probe(path, thumb_side=32)
    assert (result.width, result.height) == (200, 400)  # the full size, upright
    assert result.key_frame.shape == (100, 50, 3)  # 1/4 scale: the smallest that keeps both sides >= 32
    assert np.abs(result.key_frame.astype(int) - (10, 200, 30)).max() <= 4
    assert probe(path).key_frame is None  # pixels only when asked for


@pytest.mark.parametrize("thumb_side", [None, 32])
def test_a_truncated_jpeg_is_refused_at_any_decode_scale(tmp_path: Path, thumb_side: int | None) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    whole = io.BytesIO()
    Image.fromarray(pixels).save(whole, format="JPEG", quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(whole.getvalue()[: len(whole.getvalue()) * 9 // 10])
    assert "truncated" in str(expect_error(path, "decode_error", thumb_side=thumb_side))


def test_resize_crop_takes_the_centre() -> None:
    stripes = np.zeros((10, 30, 3), dtype=np.uint8)
    stripes[:, :10], stripes[:, 10:20], stripes[:, 20:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    assert (resize_crop(stripes, (10, 10)) == (0, 255, 0)).all()
    upscaled = resize_crop(stripes, (20, 24))
    assert upscaled.shape == (20, 24, 3)
    assert tuple(upscaled[10, 12]) == (0, 255, 0)
    with pytest.raises(ValueError):
        resize_crop(stripes.astype(np.float32), (4, 4))


# ---------------------------------------------------------------- video


def test_video_probe_with_decord(video_path: Path) -> None:
    result = probe(video_path)
    assert result.decoder == "decord"
    assert (result.modality, result.width, result.height, result.num_frames) == ("video", VIDEO_W, VIDEO_H, 12)
    assert result.fps == pytest.approx(VIDEO_FPS)
    assert result.duration_s == pytest.approx(VIDEO_FRAMES / VIDEO_FPS)


def test_video_decode_samples_evenly(video_path: Path) -> None:
    frames, fps = decode_video(video_path, 4, (16, 16))
    assert frames.shape == (4, 16, 16, 3) and frames.dtype == np.uint8
    # Centres of 4 equal segments of 12 frames are frames 1, 4, 7, 10, i.e. gray 20, 80, 140, 200.
    np.testing.assert_allclose(frames.mean(axis=(1, 2, 3)), [20, 80, 140, 200], atol=6)
    assert fps == pytest.approx(VIDEO_FPS * 4 / VIDEO_FRAMES)


def test_video_decode_more_frames_than_the_clip_has(video_path: Path) -> None:
    frames, fps = decode_video(video_path, 24, (8, 8))
    assert frames.shape == (24, 8, 8, 3)
    assert fps == pytest.approx(VIDEO_FPS * 2)


def test_narrow_video_decodes_whichever_decoder_takes_it(tmp_path: Path) -> None:
    # decord 0.6.0 fails on frames narrower than 64 px whose width is not a multiple of 32
    # ("DECORDArrayCopyFromTo: The size must exactly match"); PyAV must pick such files up.
    path = tmp_path / "narrow.mp4"
    encode_video(path, gray_video_frames(width=48), VIDEO_FPS)
    assert (probe(path).width, probe(path).num_frames) == (48, VIDEO_FRAMES)
    frames, _ = decode_video(path, 4, (16, 16))
    np.testing.assert_allclose(frames.mean(axis=(1, 2, 3)), [20, 80, 140, 200], atol=6)


def _decord_broken(path: Path):
    raise RuntimeError("decord is unavailable in this test")


def test_pyav_fallback_when_decord_fails(video_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    by_decord, decord_fps = decode_video(video_path, 4, (16, 16))
    monkeypatch.setattr(video, "open_decord", _decord_broken)
    result = probe(video_path)
    assert (result.decoder, result.num_frames, result.width, result.height) == ("pyav", 12, VIDEO_W, VIDEO_H)
    assert result.fps == pytest.approx(VIDEO_FPS)
    by_pyav, pyav_fps = decode_video(video_path, 4, (16, 16))
    assert pyav_fps == pytest.approx(decord_fps)
    np.testing.assert_allclose(by_pyav.astype(int), by_decord.astype(int), atol=2)


# ---------------------------------------------------------------- errors


def test_an_image_named_mp3_is_a_mismatch(tmp_path: Path, png_path: Path) -> None:
    liar = tmp_path / "song.mp3"
    liar.write_bytes(png_path.read_bytes())
    assert "extension .mp3 says audio but content is a PNG image" in str(expect_error(liar, "extension_mismatch"))


def test_error_not_found(tmp_path: Path) -> None:
    expect_error(tmp_path / "missing.png", "not_found")


def test_error_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    expect_error(tmp_path / "empty.png", "empty_file")


def test_error_unsupported_extension(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    expect_error(tmp_path / "notes.txt", "unsupported_extension")


def test_error_extension_mismatch(tmp_path: Path, png_path: Path) -> None:
    liar = tmp_path / "liar.wav"
    liar.write_bytes(png_path.read_bytes())
    error = expect_error(liar, "extension_mismatch")
    assert str(error) == "extension .wav says audio but content is a PNG image"


@pytest.mark.parametrize("name", ["noise.jpg", "noise.mp4", "noise.wav"])
def test_error_decode_error_for_noise(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(0).bytes(2048))
    expect_error(path, "decode_error")


def test_decode_error_names_both_video_decoders(tmp_path: Path, video_path: Path, capfd) -> None:
    truncated = tmp_path / "truncated.mp4"
    data = video_path.read_bytes()
    truncated.write_bytes(data[: len(data) * 3 // 10])
    message = str(expect_error(truncated, "decode_error"))
    assert "decord" in message and "PyAV" in message and "Invalid data" in message
    assert "moov atom not found" not in capfd.readouterr().err  # FFmpeg's own line, once per file in every worker


def test_error_text_named_flac(tmp_path: Path) -> None:
    (tmp_path / "text.flac").write_text("just words\n")
    assert "soundfile" in str(expect_error(tmp_path / "text.flac", "decode_error"))


def test_error_too_large(png_path: Path) -> None:
    expect_error(png_path, "too_large", max_pixels=1000)


def test_error_no_content_for_zero_length_audio(tmp_path: Path) -> None:
    path = tmp_path / "silent.wav"
    sf.write(str(path), np.zeros((0, 1), dtype=np.float32), 16000, subtype="PCM_16")
    expect_error(path, "no_content")


def test_error_decode_timeout_does_not_fall_back(video_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def stuck_decord(path: Path):
        time.sleep(1.0)
        raise AssertionError("the caller should have stopped waiting")

    monkeypatch.setattr(video, "open_decord", stuck_decord)
    started = time.monotonic()
    expect_error(video_path, "decode_timeout", timeout_s=0.1)
    assert time.monotonic() - started < 0.8


def test_decode_functions_raise_media_error(tmp_path: Path) -> None:
    noise = np.random.default_rng(1).bytes(1024)
    for name, decode in [
        ("n.jpg", lambda p: decode_image(p, (8, 8))),
        ("n.mp4", lambda p: decode_video(p, 2, (8, 8))),
        ("n.wav", lambda p: decode_audio(p, 16000, 10)),
    ]:
        (tmp_path / name).write_bytes(noise)
        with pytest.raises(MediaError) as info:
            decode(tmp_path / name)
        assert info.value.reason == "decode_error"


def test_media_error_survives_copy() -> None:
    # Ray ships exceptions between workers through the same reduce protocol copy uses.
    error = copy.deepcopy(MediaError("too_large", "9000x9000 is too many pixels"))
    assert (error.reason, str(error)) == ("too_large", "9000x9000 is too many pixels")


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir() or (os.cpu_count() or 1) < 2, reason="needs Linux, 2+ cores")
def test_decoders_in_a_ray_worker_use_the_threads_it_was_granted(video_path: Path, monkeypatch) -> None:
    """Ray exports a worker's CPUs as OMP_NUM_THREADS; decord and PyAV then decode on that many threads instead
    of FFmpeg's one per core (which start on every open), and give the same frames."""
    import av

    def opened(threads: str | None) -> tuple[int, np.ndarray]:
        if threads is None:
            monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        else:
            monkeypatch.setenv("OMP_NUM_THREADS", threads)
        before, reader = _threads(), video.open_decord(video_path)
        frames = reader.get_batch([0, len(reader) - 1]).asnumpy()
        started = _threads() - before
        del reader
        return started, frames

    default, frames = opened(None)
    one, same = opened("1")
    assert one < default and one <= 1
    assert np.array_equal(frames, same)
    assert media.worker_threads() == 1
    with av.open(str(video_path)) as container:
        assert video.pyav_video_stream(container).codec_context.thread_count == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert media.worker_threads() is None


def test_a_decoder_message_keeps_its_first_line_without_the_time_of_day() -> None:
    # decord's messages start with the time of day: the same broken file must get the same rejects row each run
    error = RuntimeError("[22:10:55] /src/video/video_reader.cc:151: Check failed: st_nb >= 0\nStack trace:\n  [bt] 0")
    assert media.short_error(error) == "RuntimeError: /src/video/video_reader.cc:151: Check failed: st_nb >= 0"
    assert media.short_error(ValueError("")) == "ValueError: "
