"""Clips of one video decoded one after another reuse its decord reader, with the frames a fresh open gives."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from latentforge.datasets import video
from latentforge.datasets.demo_corpus import COLORS, draw_shape, encode_video

FPS = 8


def shots(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    colors = list(COLORS)
    frames = []
    for _ in range(count):
        fg, bg = rng.choice(len(colors), 2, replace=False)
        frames += [draw_shape(64, "circle", colors[fg], colors[bg], (16 + 2 * k, 32)) for k in range(2 * FPS)]
    noisy = np.stack(frames) + rng.normal(0, 6, (len(frames), 64, 64, 3))  # inter frames that differ
    return np.clip(noisy, 0, 255).astype(np.uint8)


@pytest.fixture
def clip_video(tmp_path: Path) -> Path:
    video.READERS.forget()
    encode_video(tmp_path / "film.mp4", shots(6, 0), FPS)
    yield tmp_path / "film.mp4"
    video.READERS.forget()


def spans() -> list[tuple[float, float]]:
    return [(2.0 * k + 0.1, 2.0 * k + 1.9) for k in range(6)]


@pytest.mark.parametrize("size", [(32, 32), None])
def test_clips_decoded_on_a_kept_reader_match_a_fresh_open_in_any_order(clip_video: Path, size, monkeypatch):
    opens, open_decord = [], video.open_decord

    def counted(path, **kwargs):
        opens.append(path)
        return open_decord(path, **kwargs)

    monkeypatch.setattr(video, "open_decord", counted)
    fresh = {}
    for span in spans():
        video.READERS.forget()
        fresh[span] = video.decode_clip(clip_video, *span, 3, size)[0]
    assert len(opens) == 6
    for order in (spans(), spans()[::-1], [spans()[i] for i in (3, 0, 5, 1, 4, 2)]):
        opens.clear()
        for span in order:
            np.testing.assert_array_equal(video.decode_clip(clip_video, *span, 3, size)[0], fresh[span])
        assert len(opens) <= 1  # the reader of the previous order, or one open for all six clips


def test_another_file_at_the_same_path_and_a_failed_decode_open_afresh(clip_video: Path, monkeypatch):
    first = video.decode_clip(clip_video, 0.1, 1.9, 2, None)[0]
    encode_video(clip_video, shots(6, 1), FPS)  # same path, other content (and size)
    assert not np.array_equal(video.decode_clip(clip_video, 0.1, 1.9, 2, None)[0], first)

    taken = []
    real_take = video.READERS.take

    def take(path, width, height):
        key, reader = real_take(path, width, height)
        taken.append(reader)
        return key, reader

    def broken_fit(*_a):
        raise RuntimeError("a decode that fails half-way")

    monkeypatch.setattr(video.READERS, "take", take)
    with monkeypatch.context() as patched:
        patched.setattr(video, "_fit", broken_fit)
        with pytest.raises(RuntimeError):
            video._decord_frames_at(clip_video, np.array([1.0]), None, False)
    video.decode_clip(clip_video, 0.1, 1.9, 2, None)
    video.decode_clip(clip_video, 2.1, 3.9, 2, None)
    assert taken[1] is not taken[0] and taken[2] is taken[1]  # the reader that raised was not put back


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_a_rotated_video_reads_the_same_upright_frames_through_either_decoder(tmp_path: Path, rotation: int):
    """A phone's portrait video: landscape frames stored with a display rotation. decord turns them; PyAV (the
    fallback for what decord cannot read) now does the same, so a file's frames do not depend on its decoder."""
    import av

    path = tmp_path / f"rot{rotation}.mp4"
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:, :16] = 255  # a white band on the left and a grey one on top: every turn looks different
    stored[:8] = 128
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(rotation)
        for _ in range(6):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")))
        out.mux(stream.encode())
    upright = np.rot90(stored, rotation // 90)
    times = np.array([0.0, 0.1])
    for decode in (video._decord_frames_at, video._pyav_frames_at):
        frames, _ = decode(path, times, None, False)
        assert frames.shape[1:] == upright.shape and np.abs(frames[0].astype(int) - upright).mean() < 4, decode
    by_decord, by_pyav = video.decord_probe(path), video.pyav_probe(path)
    assert (by_decord.width, by_decord.height) == (by_pyav.width, by_pyav.height) == upright.shape[1::-1]


@pytest.mark.parametrize("matrix, full_range", [("ITU709", False), ("ITU709", True), ("ITU601", False)])
def test_a_tagged_colour_matrix_is_honoured_by_either_decoder(tmp_path: Path, matrix: str, full_range: bool):
    """HD video is BT.709 (limited range, or full range from phones); SD and untagged video BT.601. Read with the
    other matrix, a saturated red shifts by ~20 levels; both decoders read the tags, so the colour comes back."""
    import av
    from av.video.reformatter import ColorRange, Colorspace

    colour, path = np.array([200, 40, 90]), tmp_path / "tagged.mp4"
    tag, rng = {"ITU709": 1, "ITU601": 6}[matrix], 2 if full_range else 1  # AVCOL_SPC_*, AVCOL_RANGE_JPEG/MPEG
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=24, options={"crf": "0", "preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        codec = stream.codec_context
        codec.colorspace, codec.color_primaries, codec.color_trc, codec.color_range = tag, tag, tag, rng
        for i in range(6):
            frame = av.VideoFrame.from_ndarray(np.broadcast_to(colour, (32, 64, 3)).astype(np.uint8), "rgb24")
            frame = frame.reformat(format="yuv420p", dst_colorspace=getattr(Colorspace, matrix),
                                   dst_color_range=ColorRange.JPEG if full_range else ColorRange.MPEG)
            frame.colorspace, frame.color_range, frame.pts = tag, rng, i
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    with av.open(str(path)) as check:  # the file carries the tags, and the other matrix would read it wrong
        first = next(check.decode(video=0))
        assert (first.colorspace, first.color_range) == (tag, rng)
        other = Colorspace.ITU601 if matrix == "ITU709" else Colorspace.ITU709
        assert np.abs(first.reformat(format="rgb24", src_colorspace=other).to_ndarray()[16, 32] - colour).max() > 8
    for decode in (video._decord_frames_at, video._pyav_frames_at):
        frames, _ = decode(path, np.array([0.0, 0.1]), (32, 16), False)
        assert np.abs(frames.astype(int) - colour).max() <= 3, (decode, frames[0, 8, 16])


def test_a_video_without_timestamps_is_probed_in_one_pass_and_a_half(tmp_path: Path, monkeypatch, decoded):
    """When seeking cannot place frames (no timestamps: forced here), the probe counts by decoding, keeping the
    first and last frames, then decodes to the middle one only; it decoded the whole file twice."""
    frames = np.stack([np.full((16, 16, 3), 8 * i, np.uint8) for i in range(30)])
    path = tmp_path / "flat.mp4"
    encode_video(path, frames, 10)
    honest = video.pyav_probe(path)
    seeking = video._pyav_frames
    monkeypatch.setattr(video, "_pyav_frames", lambda *a, **k: None if k.get("seek", True) else seeking(*a, **k))
    decoded.clear()  # the honest probe's frames
    result = video.pyav_probe(path)
    assert (result.num_frames, result.width, result.height) == (30, 16, 16) == (honest.num_frames, 16, 16)
    np.testing.assert_array_equal(result.key_frame, honest.key_frame)
    assert len(decoded) == 30 + 30 // 2 + 1  # one whole pass, then up to the middle frame
