"""Sharpness, motion and text-area scores of split videos are measured per clip, not on the whole video.

A real video with three shots (flat static grey, static text, a pan over a detailed texture) goes through the
real ProbeMedia and SplitClips stages; each clip row must then be scored on its own frames, so the flat clip
scores low and the moving textured clip high, while an unsplit row of the same file keeps its whole-video
scores (middle frame; frames evenly spaced over the whole file).
"""
from __future__ import annotations

import numpy as np
import pytest
from lf_batches import to_batch
from test_filter_text_area import text_image  # the same two lines of text the stage's own tests use
from PIL import Image

from latentforge.datasets import video
from latentforge.datasets.demo_corpus import encode_video
from latentforge.pipelines.config import CurationConfig
from latentforge.pipelines.discover import discover
from latentforge.pipelines.stage import rows_of
from latentforge.pipelines.stages.filter_motion import FilterMotion, flow_fields, motion_scores, to_gray
from latentforge.pipelines.stages.filter_sharpness import FilterSharpness, laplacian_variance, working_size
from latentforge.pipelines.stages.filter_text_area import FilterTextArea
from latentforge.pipelines.stages.probe_media import ProbeMedia
from latentforge.pipelines.stages.split_clips import ClipSplitConfig, SplitClips

FPS, W, H = 8, 192, 128
GREY, TEXT, MOVING = 16, 16, 24  # frames per shot: 2 s, 2 s, 3 s
PAN_PX = 3  # the textured shot pans this many pixels per frame


def pan_frames() -> np.ndarray:
    """A camera panning PAN_PX px per frame over a detailed (but trackable) random texture."""
    noise = np.random.default_rng(0).integers(0, 255, (H // 4, (W + PAN_PX * MOVING) // 4, 3), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(noise).resize((noise.shape[1] * 4, H), Image.Resampling.BICUBIC))
    return np.stack([texture[:, PAN_PX * t : PAN_PX * t + W] for t in range(MOVING)])


def cfg() -> CurationConfig:
    return CurationConfig(clips=ClipSplitConfig(enabled=True, min_seconds=1.0, max_seconds=10.0))


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """discover -> probe -> the unsplit row, and split -> one row per shot; then the three real score stages."""
    root = tmp_path_factory.mktemp("clip_scores")
    grey = np.full((GREY, H, W, 3), 128, np.uint8)
    encode_video(root / "shots.mp4", np.concatenate([grey, np.stack([text_image(W, H)] * TEXT), pan_frames()]), FPS)
    probed = ProbeMedia(cfg())(to_batch(discover(root, samples_per_shard=4)))
    unsplit = rows_of(SplitClips(CurationConfig())(probed))  # splitting off: clip_index -1
    clips = rows_of(SplitClips(cfg())(probed))
    batch = to_batch([*unsplit, *clips])
    for stage in (FilterSharpness, FilterMotion, FilterTextArea):
        batch = stage(cfg())(batch)
    return {row["clip_index"]: row for row in rows_of(batch)}


def test_the_video_splits_into_its_three_shots(rows: dict) -> None:
    assert sorted(rows) == [-1, 0, 1, 2]
    for index, (start, end) in enumerate([(0, 2), (2, 4), (4, 7)]):
        clip = rows[index]
        assert clip["status"] == "ok", clip
        assert abs(clip["clip_start_s"] - start) <= 1 / FPS and abs(clip["clip_end_s"] - end) <= 1 / FPS


def test_each_clip_is_scored_on_its_own_frames(rows: dict) -> None:
    grey, text, moving = rows[0], rows[1], rows[2]
    # Sharpness: the flat grey clip has no detail at all, the textured clip a lot.
    assert grey["score_sharpness"] < 5.0 < 50.0 < moving["score_sharpness"], (grey, moving)
    # Motion: the two static clips do not move, the pan moves PAN_PX px per frame of a 128 px working side.
    assert grey["score_motion"] < 0.05 and text["score_motion"] < 0.05, (grey, text)
    assert moving["score_motion"] == pytest.approx(PAN_PX * 100 / 128, rel=0.2), moving
    # Text: only the text clip shows text.
    assert grey["score_text_area"] == 0.0
    assert text["score_text_area"] > 0.02
    assert len({round(float(rows[i]["score_sharpness"]), 3) for i in range(3)}) == 3


def test_an_unsplit_row_keeps_its_whole_video_scores(rows: dict) -> None:
    whole, config = rows[-1], cfg()
    uri, total = whole["uri"], int(whole["num_frames"])
    assert total == GREY + TEXT + MOVING
    # Sharpness: the middle frame of the whole file, at the working size.
    middle, _ = video.decode_video(uri, 1, working_size(whole, config.sharpness.size))
    assert whole["score_sharpness"] == pytest.approx(laplacian_variance(middle[0]))
    # Motion: frames evenly spaced over the whole file, flow divided by their spacing in source frames.
    m = config.motion
    frames, _ = video.decode_video(uri, m.frames, (m.size, m.size))
    expected = motion_scores(flow_fields(to_gray(frames), m.method), m.size, total / m.frames)
    assert (whole["score_motion"], whole["score_motion_jitter"]) == pytest.approx(expected)
    # Text area: the middle frame (frame 28) falls in the text shot.
    assert whole["score_text_area"] > 0.02
