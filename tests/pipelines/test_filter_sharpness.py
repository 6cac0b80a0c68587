"""FilterSharpness on real image and video files: a checkerboard against its blurred copy, demo corpus clips."""
from __future__ import annotations

import types
from pathlib import Path

import cv2
import numpy as np
import pytest
from lf_batches import by_relpath, to_batch
from PIL import Image
from pydantic import ValidationError

from latentforge.datasets.demo_corpus import DemoCorpusSpec, encode_video, generate_demo_corpus
from latentforge.pipelines.config import CurationConfig
from latentforge.pipelines.discover import discover
from latentforge.pipelines.stages.filter_sharpness import FilterSharpness, SharpnessConfig, working_size
from latentforge.pipelines.stages.probe_media import ProbeMedia


def checkerboard(height: int, width: int, square: int = 16) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    cells = ((ys // square + xs // square) % 2).astype(np.uint8) * 255
    return np.repeat(cells[..., None], 3, axis=2)


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    root = tmp_path_factory.mktemp("sharpness")
    generate_demo_corpus(root, DemoCorpusSpec(num_images=2, num_videos=1, num_audio=1, include_broken=False))
    (root / "extra").mkdir()
    sharp = checkerboard(256, 384)
    Image.fromarray(sharp).save(root / "extra" / "sharp.png")
    Image.fromarray(cv2.GaussianBlur(sharp, (0, 0), 4)).save(root / "extra" / "blurred.png")
    Image.fromarray(np.full((200, 300, 3), (30, 140, 90), np.uint8)).save(root / "extra" / "flat.png")
    # A clip whose middle frame is the checkerboard and whose other frames are flat grey.
    frames = np.full((9, 128, 128, 3), 128, np.uint8)
    frames[4] = checkerboard(128, 128)
    encode_video(root / "extra" / "middle_sharp.mp4", frames, 8)
    return ProbeMedia(CurationConfig())(to_batch(discover(root, samples_per_shard=64)))


def run(batch: dict[str, np.ndarray], **settings) -> dict[str, dict]:
    stage = FilterSharpness(types.SimpleNamespace(sharpness=SharpnessConfig(**settings), decode_timeout_s=30.0))
    return by_relpath(stage({k: v.copy() for k, v in batch.items()}))


def test_a_sharp_checkerboard_scores_far_above_its_blurred_copy(probed: dict) -> None:
    rows = run(probed)
    sharp, blurred = rows["extra/sharp.png"]["score_sharpness"], rows["extra/blurred.png"]["score_sharpness"]
    assert sharp > 20 * blurred > 0
    assert rows["extra/flat.png"]["score_sharpness"] == pytest.approx(0.0, abs=1e-6)


def test_videos_are_scored_on_their_middle_frame(probed: dict) -> None:
    rows = run(probed)
    assert rows["extra/middle_sharp.mp4"]["score_sharpness"] > 1000  # the grey frames around it would score ~0
    assert rows["videos/vid_00000.mp4"]["score_sharpness"] > 0  # a shape edge


def test_audio_rows_pass_through_with_the_default_score(probed: dict) -> None:
    rows = run(probed, min_sharpness=1e9)
    audio = [r for r in rows.values() if r["modality"] == "audio"]
    assert audio and all(r["score_sharpness"] == 0.0 and r["status"] == "ok" for r in audio)


def test_min_sharpness_filters_the_blurred_image_and_keeps_the_sharp_one(probed: dict) -> None:
    rows = run(probed)
    threshold = (rows["extra/sharp.png"]["score_sharpness"] + rows["extra/blurred.png"]["score_sharpness"]) / 2
    rows = run(probed, min_sharpness=threshold)
    blurred = rows["extra/blurred.png"]
    assert (blurred["status"], blurred["reason"], blurred["stage"]) == ("filtered", "sharpness_below_min",
                                                                        "filter_sharpness")
    assert blurred["score_sharpness"] > 0 and "Laplacian variance" in blurred["message"]
    assert rows["extra/sharp.png"]["status"] == "ok"


def test_disabled_stage_writes_defaults_and_filters_nothing(probed: dict) -> None:
    rows = run(probed, enabled=False, min_sharpness=1e9)
    assert all(r["score_sharpness"] == 0.0 and r["status"] != "filtered" for r in rows.values())


def test_working_size_keeps_the_aspect_ratio_with_the_longer_side_fixed() -> None:
    assert working_size({"width": 384, "height": 256}, 192) == (128, 192)
    assert working_size({"width": 100, "height": 400}, 200) == (200, 50)
    assert working_size({"width": 0, "height": 0}, 64) == (64, 64)


def test_an_undecodable_image_is_rejected_with_the_media_reason(tmp_path: Path) -> None:
    broken = tmp_path / "noise.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + np.random.default_rng(0).bytes(512))
    row = {"id": "s1", "uri": str(broken), "relpath": "noise.png", "status": "ok", "reason": "", "message": "",
           "stage": "", "modality": "image", "width": 64, "height": 64}
    out = run(to_batch([row]))["noise.png"]
    assert (out["status"], out["reason"], out["stage"]) == ("rejected", "decode_error", "filter_sharpness")


def test_config_forbids_unknown_keys() -> None:
    with pytest.raises(ValidationError):
        SharpnessConfig(min_sharpnes=1.0)
