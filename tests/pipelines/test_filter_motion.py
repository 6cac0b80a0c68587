"""FilterMotion on real encoded videos (demo corpus shapes, a static clip, a pan, a shake) with real OpenCV flow."""
from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
from lf_batches import by_relpath, to_batch
from PIL import Image
from pydantic import ValidationError

from latentforge.datasets.demo_corpus import DemoCorpusSpec, draw_shape, encode_video, generate_demo_corpus
from latentforge.pipelines.config import CurationConfig
from latentforge.pipelines.discover import discover
from latentforge.pipelines.stages.filter_motion import FilterMotion, MotionConfig
from latentforge.pipelines.stages.probe_media import ProbeMedia

MOVING = [f"videos/vid_{n:05d}.mp4" for n in range(3)]  # 16-frame clips of a shape crossing the frame


def texture_crops(offsets: list[tuple[int, int]], seed: int = 0) -> np.ndarray:
    """128x128 windows of one smooth random texture at the given (x, y) offsets: a camera moving over it."""
    noise = np.random.default_rng(seed).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(noise).resize((192, 192), Image.Resampling.BICUBIC))
    return np.stack([texture[y : y + 128, x : x + 128] for x, y in offsets])


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """discover -> probe over a small demo corpus plus static, panning and shaking clips."""
    root = tmp_path_factory.mktemp("motion")
    generate_demo_corpus(root, DemoCorpusSpec(num_images=1, num_videos=3, num_audio=1, include_broken=False))
    static = draw_shape(64, "circle", "red", "blue", (32, 32))
    (root / "extra").mkdir()
    encode_video(root / "extra" / "static.mp4", np.stack([static] * 16), 8)
    encode_video(root / "extra" / "pan.mp4", texture_crops([(8 + 3 * t, 16) for t in range(8)]), 8)
    shake = np.random.default_rng(1).integers(10, 22, (8, 2)).tolist()
    encode_video(root / "extra" / "shake.mp4", texture_crops([tuple(o) for o in shake]), 8)
    return ProbeMedia(CurationConfig())(to_batch(discover(root, samples_per_shard=64)))


def run(batch: dict[str, np.ndarray], **settings) -> dict[str, dict]:
    stage = FilterMotion(types.SimpleNamespace(motion=MotionConfig(**settings), decode_timeout_s=30.0))
    return by_relpath(stage({k: v.copy() for k, v in batch.items()}))


@pytest.mark.parametrize("method", ["farneback", "dis"])
def test_moving_shapes_score_clearly_above_a_static_clip(probed: dict, method: str) -> None:
    rows = run(probed, method=method)
    static = rows["extra/static.mp4"]
    assert static["score_motion"] < 0.05 and static["score_motion_jitter"] == 0.0
    for relpath in MOVING:
        assert rows[relpath]["score_motion"] > 0.3 > 6 * static["score_motion"], relpath
        assert rows[relpath]["status"] == "ok"  # min_motion 0 keeps everything


def test_score_motion_is_percent_of_the_frame_side_per_frame(probed: dict) -> None:
    # The pan moves 3 px per frame in 128 px frames: 2.34% of the side, whatever working size is used.
    for size in (64, 128):
        assert run(probed, size=size, frames=8)["extra/pan.mp4"]["score_motion"] == pytest.approx(300 / 128, rel=0.15)


@pytest.mark.parametrize("method", ["farneback", "dis"])
def test_jitter_is_high_for_shake_and_low_for_a_steady_pan(probed: dict, method: str) -> None:
    rows = run(probed, method=method)
    assert rows["extra/pan.mp4"]["score_motion_jitter"] < 0.1
    assert rows["extra/shake.mp4"]["score_motion_jitter"] > 0.5


def test_other_modalities_pass_through_with_default_scores(probed: dict) -> None:
    rows = run(probed, min_motion=100.0)
    for relpath, row in rows.items():
        if row["modality"] != "video":
            assert (row["score_motion"], row["score_motion_jitter"]) == (0.0, 0.0)
            assert row["status"] == probed["status"][list(probed["relpath"]).index(relpath)]


def test_thresholds_filter_with_reason_and_keep_scores(probed: dict) -> None:
    rows = run(probed, min_motion=0.1, max_motion=2.0)
    static, shake = rows["extra/static.mp4"], rows["extra/shake.mp4"]
    assert (static["status"], static["reason"], static["stage"]) == ("filtered", "motion_below_min", "filter_motion")
    assert "< 0.1" in static["message"]
    assert (shake["status"], shake["reason"]) == ("filtered", "motion_above_max")
    assert shake["score_motion"] > 2.0  # the score is kept on a filtered row
    assert all(rows[p]["status"] == "ok" for p in MOVING)


def test_disabled_stage_writes_defaults_and_filters_nothing(probed: dict) -> None:
    rows = run(probed, enabled=False, min_motion=100.0)
    assert all(r["score_motion"] == 0.0 and r["status"] != "filtered" for r in rows.values())


def test_an_undecodable_video_is_rejected_with_the_media_reason(tmp_path: Path, probed: dict) -> None:
    broken = tmp_path / "noise.mp4"
    broken.write_bytes(np.random.default_rng(0).bytes(4096))
    row = {"id": "s1", "uri": str(broken), "relpath": "noise.mp4", "status": "ok", "reason": "", "message": "",
           "stage": "", "modality": "video", "num_frames": 16}
    out = run(to_batch([row]))["noise.mp4"]
    assert (out["status"], out["reason"], out["stage"]) == ("rejected", "decode_error", "filter_motion")
    assert out["score_motion"] == 0.0


def test_config_forbids_unknown_keys_and_bad_methods() -> None:
    with pytest.raises(ValidationError):
        MotionConfig(min_motoin=1.0)
    with pytest.raises(ValidationError):
        MotionConfig(method="lucas-kanade")
