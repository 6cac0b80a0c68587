"""Videos decord cannot open (AV1: its FFmpeg has no decoder for it) go through PyAV, which seeks to the frames
it is asked for: decoding from the first frame on every call made a film's clips quadratic in its length."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from latentforge.datasets import media, video
from latentforge.datasets.demo_corpus import COLORS, draw_shape

FPS, SECONDS = 12, 40


def encode_av1(path: Path, frames: np.ndarray, fps: int) -> None:
    import av

    if "libsvtav1" not in av.codecs_available:
        pytest.skip("this PyAV build has no AV1 encoder")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libsvtav1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.gop_size = 2 * fps  # a keyframe every 2 s, as streaming encodes have
        for pixels in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def av1_film(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 s at 12 fps, a moving circle on a new background every 2 s (so every frame differs)."""
    colors = list(COLORS)
    frames = [draw_shape(48, "circle", colors[(i // (2 * FPS)) % len(colors)], colors[(i // (2 * FPS) + 3) % len(colors)],
                         (8 + i % (2 * FPS), 24)) for i in range(SECONDS * FPS)]
    path = tmp_path_factory.mktemp("av1") / "film.mp4"
    encode_av1(path, np.stack(frames), FPS)
    return path


def test_decord_refuses_av1_and_the_probe_decodes_three_frames_not_all(av1_film: Path, decoded: list[int]):
    with pytest.raises(Exception):
        video.open_decord(av1_film)  # the premise: without PyAV these files could not be curated at all
    info = media.probe(av1_film)
    assert (info.decoder, info.num_frames, info.fps, info.width) == ("pyav", SECONDS * FPS, FPS, 48)
    assert info.key_frame.shape == (48, 48, 3)
    assert 0 < len(decoded) < SECONDS * FPS / 4  # the first, middle and last frames with their keyframes' runs


@pytest.mark.parametrize("times", [[37.5], [12.1, 12.6, 13.0], [1.0, 20.0, 39.9], [30.2, 5.3, 30.2]])
def test_seeking_gives_the_frames_a_decode_from_the_start_gives(av1_film: Path, decoded: list[int], times):
    from_start, fps_a = video._pyav_frames_at(av1_film, np.array(times), (32, 32), False, seek=False)
    counted_from_start = len(decoded)
    decoded.clear()
    seeking, fps_b = video.decode_frames_at(av1_film, np.array(times), (32, 32))  # decord refuses: PyAV, seeking
    assert fps_a == fps_b == FPS
    np.testing.assert_array_equal(seeking, from_start)
    assert len(decoded) < counted_from_start / 2


def test_a_film_cut_into_clips_decodes_each_clip_near_its_own_frames(av1_film: Path, decoded: list[int]):
    """Every 2 s clip's four frames, in order: linear in the film's length, where it was quadratic."""
    for start in range(0, SECONDS, 2):
        frames, _ = video.decode_clip(av1_film, start + 0.1, start + 1.9, 4, (16, 16))
        assert frames.shape == (4, 16, 16, 3)
    assert len(decoded) < SECONDS * FPS  # from the start each time: ~SECONDS / 2 times that


def test_a_truncated_av1_file_is_a_decode_error(av1_film: Path, tmp_path: Path):
    data = av1_film.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(media.MediaError):
        media.probe(cut)


def test_evenly_spaced_frames_of_a_whole_video_seek_too(av1_film: Path, decoded: list[int], monkeypatch):
    """The middle frame (sharpness, the hash of an unsplit video) was a decode of half the file."""
    frames, fps = video.decode_video(av1_film, 1, (24, 24))
    assert frames.shape == (1, 24, 24, 3) and fps == pytest.approx(FPS / (SECONDS * FPS))
    assert 0 < len(decoded) < SECONDS * FPS / 4
    sought = {count: video.decode_video(av1_film, count, (24, 24))[0] for count in (1, 5)}
    seeking = video._pyav_frames
    monkeypatch.setattr(video, "_pyav_frames", lambda *a, **k: seeking(*a, **{**k, "seek": False}))
    for count, frames in sought.items():
        np.testing.assert_array_equal(video.decode_video(av1_film, count, (24, 24))[0], frames)
