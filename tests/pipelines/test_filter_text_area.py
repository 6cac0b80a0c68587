"""FilterTextArea with rapidocr's packaged ONNX text detector on rendered text, plain colour and a text video."""
from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
from lf_batches import by_relpath, to_batch
from PIL import Image, ImageDraw, ImageFont
from pydantic import ValidationError

from latentforge.datasets.demo_corpus import encode_video
from latentforge.pipelines.config import CurationConfig
from latentforge.pipelines.discover import discover
from latentforge.pipelines.stages.filter_text_area import FilterTextArea, TextAreaConfig
from latentforge.pipelines.stages.probe_media import ProbeMedia


def text_image(width: int, height: int) -> np.ndarray:
    """Two lines of large dark text on a light background (Pillow's bundled scalable font)."""
    image = Image.new("RGB", (width, height), (250, 248, 240))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=height // 6)
    draw.text((width // 20, height // 6), "LATENT FORGE", fill=(10, 10, 10), font=font)
    draw.text((width // 20, height // 2), "curation 2024", fill=(10, 10, 10), font=font)
    return np.asarray(image)


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    root = tmp_path_factory.mktemp("text_area")
    Image.fromarray(text_image(640, 360)).save(root / "text.png")
    Image.new("RGB", (480, 320), (40, 120, 200)).save(root / "plain.jpg")
    frames = np.stack([text_image(192, 128)] * 4)
    encode_video(root / "text.mp4", frames, 8)
    (root / "tone.wav").write_bytes(b"")  # rejected by probe: must stay rejected and untouched here
    return ProbeMedia(CurationConfig())(to_batch(discover(root, samples_per_shard=64)))


@pytest.fixture(scope="module")
def stage() -> FilterTextArea:
    """The detector loads once for the module; thresholds are swapped per test on the same engine."""
    return FilterTextArea(types.SimpleNamespace(text_area=TextAreaConfig(), decode_timeout_s=30.0))


def run(stage: FilterTextArea, batch: dict[str, np.ndarray], **settings) -> dict[str, dict]:
    stage.cfg = types.SimpleNamespace(text_area=TextAreaConfig(**settings), decode_timeout_s=30.0)
    return by_relpath(stage({k: v.copy() for k, v in batch.items()}))


def test_rendered_text_covers_part_of_the_frame_and_a_plain_image_none(stage, probed: dict) -> None:
    rows = run(stage, probed)
    assert 0.02 < rows["text.png"]["score_text_area"] < 0.8
    assert rows["plain.jpg"]["score_text_area"] == 0.0
    assert all(rows[p]["status"] == "ok" for p in ("text.png", "plain.jpg"))  # max_text_area 1.0 keeps all


def test_videos_are_scored_on_their_middle_frame(stage, probed: dict) -> None:
    assert run(stage, probed)["text.mp4"]["score_text_area"] > 0.02


def test_max_text_area_filters_the_text_image_with_its_reason(stage, probed: dict) -> None:
    rows = run(stage, probed, max_text_area=0.01)
    text = rows["text.png"]
    assert (text["status"], text["reason"], text["stage"]) == ("filtered", "text_area_above_max", "filter_text_area")
    assert text["score_text_area"] > 0.02 and "of the frame" in text["message"]
    assert rows["plain.jpg"]["status"] == "ok"


def test_rows_already_rejected_are_left_alone(stage, probed: dict) -> None:
    tone = run(stage, probed, max_text_area=0.0)["tone.wav"]
    assert (tone["status"], tone["stage"], tone["score_text_area"]) == ("rejected", "probe", 0.0)


def test_an_undecodable_video_is_rejected_with_the_media_reason(stage, tmp_path: Path) -> None:
    broken = tmp_path / "noise.mp4"
    broken.write_bytes(np.random.default_rng(0).bytes(4096))
    row = {"id": "s1", "uri": str(broken), "relpath": "noise.mp4", "status": "ok", "reason": "", "message": "",
           "stage": "", "modality": "video", "width": 64, "height": 64}
    out = run(stage, to_batch([row]))["noise.mp4"]
    assert (out["status"], out["reason"], out["stage"]) == ("rejected", "decode_error", "filter_text_area")


def test_disabled_stage_loads_no_detector_and_filters_nothing(probed: dict) -> None:
    off = FilterTextArea(types.SimpleNamespace(text_area=TextAreaConfig(enabled=False, max_text_area=0.0),
                                               decode_timeout_s=30.0))
    assert off.detector is None
    rows = by_relpath(off({k: v.copy() for k, v in probed.items()}))
    assert all(r["score_text_area"] == 0.0 and r["status"] != "filtered" for r in rows.values())


def test_config_rejects_unknown_keys_and_fractions_above_one() -> None:
    with pytest.raises(ValidationError):
        TextAreaConfig(max_text=0.1)
    with pytest.raises(ValidationError):
        TextAreaConfig(max_text_area=1.5)
