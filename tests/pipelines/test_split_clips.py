"""Shot-boundary clip splitting on real encoded videos: cuts, clip rows, decode_clip, broken files."""
from __future__ import annotations

import shutil
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
