"""Shot-boundary clip splitting on real encoded videos: cuts, clip rows, decode_clip, broken files."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
from lf_batches import to_batch
from PIL import Image
from pydantic import ValidationError

from latentforge.datasets import media, video
from latentforge.datasets.demo_corpus import COLORS, draw_shape, encode_video
from latentforge.datasets.video import decode_clip
from latentforge.pipelines.config import FilterConfig
from latentforge.pipelines.discover import discover
from latentforge.pipelines.stages import split_clips
from latentforge.pipelines.stage import rows_of
from latentforge.pipelines.stages.probe_media import ProbeMedia
from latentforge.pipelines.stages.split_clips import (
    CLIP_COLUMNS,
    ClipSplitConfig,
    SplitClips,
    detect_cuts,
    split_shot,
)

FPS, SIDE = 8, 64
# (frames, shape, colour, background, moving): 2 s + 3 s + 1.5 s; the middle shot moves, which is no cut.
THREE_SHOTS = [(16, "circle", "red", "blue", False), (24, "square", "yellow", "black", True),
               (12, "triangle", "white", "green", False)]
SHORT_SHOTS = [(4, "circle", "red", "blue", False), (4, "square", "white", "black", False),
               (4, "circle", "yellow", "green", False), (4, "square", "red", "white", False)]
CLIPS = ClipSplitConfig(enabled=True, min_seconds=1.0, max_seconds=2.5)


def shot_frames(shots) -> np.ndarray:
    out = []
    for count, shape, colour, background, moving in shots:
        for k in range(count):
            x = (0.3 + 0.4 * k / count) if moving else 0.5
            out.append(draw_shape(SIDE, shape, colour, background, (x * SIDE, 0.5 * SIDE)))
    return np.stack(out)


def stage_cfg(clips: ClipSplitConfig = CLIPS) -> SimpleNamespace:
    return SimpleNamespace(clips=clips, decode_timeout_s=30.0, filters=FilterConfig())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clips")
    encode_video(root / "three_shots.mp4", shot_frames(THREE_SHOTS), FPS)
    encode_video(root / "short_shots.mp4", shot_frames(SHORT_SHOTS), FPS)
    Image.fromarray(draw_shape(SIDE, "circle", "red", "blue", (32, 32))).save(root / "still.png")
    sf.write(str(root / "tone.wav"), np.zeros(8000, np.float32), 8000)
    return root


@pytest.fixture(scope="module")
def probed(corpus: Path) -> dict[str, np.ndarray]:
    """discover -> probe, the way the pipeline hands rows to SplitClips."""
    return ProbeMedia(stage_cfg())(to_batch(discover(corpus, samples_per_shard=4)))


@pytest.fixture(scope="module")
def split(probed: dict[str, np.ndarray]) -> list[dict]:
    return rows_of(SplitClips(stage_cfg())(probed))


def test_cuts_are_found_at_shot_boundaries_and_not_in_motion(corpus: Path):
    cuts = detect_cuts(corpus / "three_shots.mp4", 6.5, CLIPS, timeout_s=30.0)
    assert len(cuts) == 2, cuts  # the moving square in shot 2 must not look like a cut
    for found, expected in zip(cuts, (2.0, 5.0)):
        assert abs(found - expected) <= 1 / CLIPS.analysis_fps


def test_shots_become_clips_no_longer_than_max(split: list[dict], probed):
    parent = next(r for r in rows_of(probed) if r["relpath"] == "three_shots.mp4")
    clips = sorted((r for r in split if r["source_id"] == parent["id"]), key=lambda r: r["clip_index"])
    spans = [(r["clip_start_s"], r["clip_end_s"]) for r in clips]
    # 2 s stays whole, 3 s > max 2.5 becomes two 1.5 s pieces, 1.5 s stays whole.
    np.testing.assert_allclose(spans, [(0, 2), (2, 3.5), (3.5, 5), (5, 6.5)], atol=1 / CLIPS.analysis_fps)
    assert [r["id"] for r in clips] == [f"{parent['id']}c{i:03d}" for i in range(4)]
    for r in clips:
        assert r["status"] == "ok" and "." not in r["id"]
        assert (r["uri"], r["relpath"], r["caption_path"], r["shard"]) == (
            parent["uri"], parent["relpath"], parent["caption_path"], parent["shard"])
        assert r["modality"] == "video" and r["width"] == parent["width"]  # other columns copied


def test_every_input_is_accounted_for(split: list[dict], probed):
    inputs = {r["id"] for r in rows_of(probed)}
    ids = [r["id"] for r in split]
    assert len(ids) == len(set(ids))
    assert {r["source_id"] for r in split} == inputs  # every output comes from an input, every input comes out
    assert set(CLIP_COLUMNS) <= set(split[0])


def test_video_without_a_long_enough_shot_is_one_filtered_row(split: list[dict]):
    rows = [r for r in split if r["relpath"] == "short_shots.mp4"]
    assert len(rows) == 1
    row = rows[0]
    assert (row["status"], row["reason"], row["stage"]) == ("filtered", "no_clip_long_enough", "split_clips")
    assert row["id"] == row["source_id"] and row["clip_index"] == -1


def test_images_audio_and_failed_rows_pass_through(probed):
    batch = {k: v.copy() for k, v in probed.items()}
    video = list(batch["relpath"]).index("three_shots.mp4")
    batch["status"][video], batch["reason"][video] = "rejected", "earlier_stage"
    rows = rows_of(SplitClips(stage_cfg())(batch))
    assert len(rows) == len(batch["id"])  # the rejected video is not split; short_shots -> 1 filtered row
    by_path = {r["relpath"]: r for r in rows}
    for path, duration in (("still.png", 0.0), ("tone.wav", 1.0), ("three_shots.mp4", 6.5)):
        r = by_path[path]
        assert (r["clip_index"], r["source_id"], r["clip_start_s"]) == (-1, r["id"], 0.0)
        assert r["clip_end_s"] == pytest.approx(duration)
    assert by_path["three_shots.mp4"]["reason"] == "earlier_stage"


def test_disabled_stage_is_identity_plus_columns(probed):
    out = SplitClips(stage_cfg(ClipSplitConfig(enabled=False)))(probed)
    assert list(out["id"]) == list(probed["id"])
    for key, column in probed.items():
        assert list(out[key]) == list(column)
    assert list(out["clip_index"]) == [-1] * len(probed["id"])
    assert list(out["source_id"]) == list(probed["id"])


def test_split_shot_prefers_equal_pieces_and_drops_short_ones():
    cfg = ClipSplitConfig(min_seconds=1.0, max_seconds=2.5)
    assert split_shot(2.0, 5.0, cfg) == [(2.0, 3.5), (3.5, 5.0)]
    assert split_shot(0.0, 0.5, cfg) == []
    # Equal pieces (5.5 s) would fall under min 6 s: keep a full 10 s piece, drop the 1 s rest.
    assert split_shot(0.0, 11.0, ClipSplitConfig(min_seconds=6.0, max_seconds=10.0)) == [(0.0, 10.0)]


@pytest.mark.parametrize("span, background", [((0.0, 2.0), "blue"), ((2.0, 5.0), "black"), ((5.0, 6.5), "green")])
def test_decode_clip_returns_frames_of_its_shot(corpus: Path, span, background):
    frames, fps = decode_clip(corpus / "three_shots.mp4", *span, num_frames=3, size=(32, 32), timeout_s=30.0)
    assert frames.shape == (3, 32, 32, 3) and frames.dtype == np.uint8
    assert fps == pytest.approx(3 / (span[1] - span[0]))
    corners = frames[:, [0, 0, -1, -1], [0, -1, 0, -1]].reshape(-1, 3).astype(float)
    assert np.abs(corners - COLORS[background]).max() < 30


def test_pyav_fallback_decodes_the_same_frames(corpus: Path):
    times = np.array([0.3, 2.6, 6.2])
    path = corpus / "three_shots.mp4"
    via_decord, fps_d = video._decord_frames_at(path, times, (32, 32), stretch=False)
    via_pyav, fps_p = video._pyav_frames_at(path, times, (32, 32), stretch=False)
    assert fps_d == fps_p == FPS
    assert np.abs(via_decord.astype(int) - via_pyav.astype(int)).mean() < 2


def test_truncated_video_is_rejected_not_raised(corpus: Path, tmp_path: Path):
    data = (corpus / "three_shots.mp4").read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) * 3 // 10])
    rows = discover(tmp_path, samples_per_shard=4)
    unprobed = {**rows[0], "modality": "video"}  # as if an earlier stage had let it through
    claimed = {**rows[0], "modality": "video", "duration_s": 6.5, "id": rows[0]["id"] + "x"}
    out = rows_of(SplitClips(stage_cfg())(to_batch([unprobed, claimed])))
    assert [r["status"] for r in out] == ["rejected", "rejected"]
    assert all(r["reason"] == "decode_error" and r["stage"] == "split_clips" for r in out)
    with pytest.raises(media.MediaError):
        decode_clip(tmp_path / "truncated.mp4", 0.0, 1.0, 2, None, timeout_s=30.0)


def test_config_is_strict():
    with pytest.raises(ValidationError):
        ClipSplitConfig(min_seconds=5.0, max_seconds=2.0)
    with pytest.raises(ValidationError):
        ClipSplitConfig(treshold=0.5)


def test_missing_file_is_rejected(tmp_path: Path, corpus: Path):
    shutil.copy(corpus / "three_shots.mp4", tmp_path / "gone.mp4")
    row = {**discover(tmp_path, 4)[0], "modality": "video", "duration_s": 6.5}
    (tmp_path / "gone.mp4").unlink()
    out = rows_of(SplitClips(stage_cfg())(to_batch([row])))[0]
    assert out["status"] == "rejected" and out["reason"]


# ---------------------------------------------------------------- long videos: windowed analysis decode

NATIVE_FPS = 24
# Cuts at native frames 50 and 77 of a 24 fps video: neither on the 8 fps analysis grid (every 3rd frame).
OFF_GRID_SHOTS = [(50, "circle", "red", "blue", False), (27, "square", "yellow", "black", True),
                  (43, "triangle", "white", "green", False)]


def _one_window(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("WINDOW_FRAMES", 10**9), ("WINDOW_SECONDS", 1e9), ("WINDOW_PIXELS", 1 << 62)):
        monkeypatch.setattr(split_clips, name, value, raising=False)


def _windows_of(monkeypatch: pytest.MonkeyPatch, frames: int) -> list[tuple[int, float]]:
    """Windows of `frames` analysis frames; returns the (frame count, timeout) of every decode call made."""
    monkeypatch.setattr(split_clips, "WINDOW_FRAMES", frames, raising=False)
    calls, decode = [], split_clips.decode_frames_at

    def recorded(uri, times, *args, **kwargs):
        calls.append((len(times), kwargs["timeout_s"]))
        return decode(uri, times, *args, **kwargs)

    monkeypatch.setattr(split_clips, "decode_frames_at", recorded)
    return calls


@pytest.mark.parametrize("window", [2, 5, 8, 16])
@pytest.mark.parametrize("name", ["three_shots.mp4", "off_grid.mp4"])
def test_windowed_analysis_finds_the_same_cuts_as_one_decode(corpus: Path, tmp_path: Path, monkeypatch, name,
                                                              window):
    if name == "off_grid.mp4":
        encode_video(tmp_path / name, shot_frames(OFF_GRID_SHOTS), NATIVE_FPS)
    path = (corpus if name == "three_shots.mp4" else tmp_path) / name
    duration = 6.5 if name == "three_shots.mp4" else 5.0
    with monkeypatch.context() as m:
        _one_window(m)
        whole = detect_cuts(path, duration, CLIPS, timeout_s=30.0)
    calls = _windows_of(monkeypatch, window)
    assert detect_cuts(path, duration, CLIPS, timeout_s=17.0) == whole and len(whole) == 2
    # 8 fps: windows of 2 and 8 put a cut (analysis frames 15 | 16 and 39 | 40) across a window boundary.
    assert len(calls) >= duration * CLIPS.analysis_fps / window
    assert all(count <= window and timeout == 17.0 for count, timeout in calls), calls


def test_each_window_gets_its_own_decode_timeout(corpus: Path, tmp_path: Path, monkeypatch):
    """A video whose whole analysis decode outlasts the timeout is split when each window's decode fits in it.

    Decoding is slowed to 20 ms a frame inside the timed decode: 104 analysis frames take over 2 s in one
    decode against a 1 s timeout, a window of 8 about 0.16 s.
    """
    path = tmp_path / "long.mp4"
    encode_video(path, shot_frames(THREE_SHOTS * 2), FPS)  # 13 s, cuts at 2, 5, 6.5, 8.5 and 11.5 s
    expected = detect_cuts(path, 13.0, CLIPS, timeout_s=30.0)
    np.testing.assert_allclose(expected, [2.0, 5.0, 6.5, 8.5, 11.5], atol=1 / CLIPS.analysis_fps)
    decode = video._decord_frames_at

    def slow(path, times_s, *args):
        time.sleep(0.02 * len(times_s))
        return decode(path, times_s, *args)

    monkeypatch.setattr(video, "_decord_frames_at", slow)
    with monkeypatch.context() as m:  # the premise: one decode of the whole video times out
        _one_window(m)
        with pytest.raises(media.MediaError) as caught:
            detect_cuts(path, 13.0, CLIPS, timeout_s=1.0)
        assert caught.value.reason == "decode_timeout"
    monkeypatch.setattr(split_clips, "WINDOW_FRAMES", 8, raising=False)
    assert detect_cuts(path, 13.0, CLIPS, timeout_s=1.0) == expected


# ---------------------------------------------------------------- cuts at native-frame precision


def test_clip_before_an_off_grid_cut_holds_no_frame_of_the_next_shot(tmp_path: Path):
    """A hard cut at native frame 50 of a 24 fps video falls between analysis frames 48 and 51 (8 fps)."""
    shots = [(50, "circle", "red", "blue", False), (50, "square", "yellow", "black", False)]
    encode_video(tmp_path / "cut50.mp4", shot_frames(shots), NATIVE_FPS)
    clips = rows_of(SplitClips(stage_cfg())(ProbeMedia(stage_cfg())(to_batch(discover(tmp_path, 4)))))
    assert [(r["status"], r["clip_index"]) for r in clips] == [("ok", 0), ("ok", 1)]

    def backgrounds(frames: np.ndarray) -> list[str]:
        corners = frames[:, [0, 0, -1, -1], [0, -1, 0, -1]].astype(float).mean(axis=1)
        return [min(COLORS, key=lambda c: np.abs(corner - COLORS[c]).sum()) for corner in corners]

    first, second = clips[0], clips[1]
    native = round((first["clip_end_s"] - first["clip_start_s"]) * NATIVE_FPS)
    for count in (32, 49, native):
        frames, _ = decode_clip(first["uri"], first["clip_start_s"], first["clip_end_s"], count, (32, 32))
        assert set(backgrounds(frames)) == {"blue"}, (count, backgrounds(frames))
    native = round((second["clip_end_s"] - second["clip_start_s"]) * NATIVE_FPS)
    frames, _ = decode_clip(second["uri"], second["clip_start_s"], second["clip_end_s"], native, (32, 32))
    assert backgrounds(frames)[0] == "black"
    assert first["clip_end_s"] == second["clip_start_s"] == pytest.approx(50 / NATIVE_FPS)
