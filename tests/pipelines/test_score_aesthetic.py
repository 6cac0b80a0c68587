"""ScoreAesthetic on a tiny random CLIP vision tower and a tiny head, both saved to disk and loaded through
the real from_pretrained / safetensors paths, on real images, videos and audio."""
from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from lf_batches import by_relpath, to_batch
from pydantic import ValidationError
from tiny_models import save_clip_vision

from latentforge.datasets.demo_corpus import DemoCorpusSpec, generate_demo_corpus
from latentforge.datasets.video import decode_clip
from latentforge.pipelines.config import CurationConfig
from latentforge.pipelines.curate import STAGES, stage_graph
from latentforge.pipelines.discover import discover
from latentforge.pipelines.stages.filter_sharpness import decode_still
from latentforge.pipelines.stages.probe_media import ProbeMedia
from latentforge.pipelines.stages.score_aesthetic import (
    HEAD_CONFIG,
    HEAD_WEIGHTS,
    AestheticConfig,
    ScoreAesthetic,
    build_head,
    key_frame,
    load_head,
    save_head,
)
from latentforge.pipelines.stages.split_clips import SplitClips

HEAD = {"input_dim": 16, "hidden_dims": [8, 4], "dropout": [0.2, 0.0]}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("aesthetic")
    clip = save_clip_vision(root / "clip")
    torch.manual_seed(1)
    head = save_head(build_head(HEAD), HEAD, root / "head")
    return clip, str(head)


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    root = tmp_path_factory.mktemp("aesthetic_corpus")
    generate_demo_corpus(root, DemoCorpusSpec(num_images=3, num_videos=1, num_audio=1, include_broken=False))
    (root / "empty.png").write_bytes(b"")  # rejected by probe: must stay untouched here
    cfg = CurationConfig(input_dir=root)
    return SplitClips(cfg)(ProbeMedia(cfg)(to_batch(discover(root, samples_per_shard=64))))


def stage_cfg(models: tuple[str, str], **settings) -> types.SimpleNamespace:
    clip, head = models
    return types.SimpleNamespace(aesthetic=AestheticConfig(enabled=True, clip_model=clip, head=head, size=48,
                                                           **settings), decode_timeout_s=30.0)


@pytest.fixture(scope="module")
def stage(models: tuple[str, str]) -> ScoreAesthetic:
    return ScoreAesthetic(stage_cfg(models))


def run(stage: ScoreAesthetic, batch: dict[str, np.ndarray], models, **settings) -> dict[str, dict]:
    stage.cfg = stage_cfg(models, **settings)
    return by_relpath(stage({k: v.copy() for k, v in batch.items()}))


def reference_score(models: tuple[str, str], frame: np.ndarray) -> float:
    """The score computed here from the saved files with transformers and torch alone."""
    from safetensors.torch import load_file
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    clip, head_dir = models
    pixels = CLIPImageProcessor.from_pretrained(clip)(images=[frame], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        embed = CLIPVisionModelWithProjection.from_pretrained(clip).eval()(pixel_values=pixels).image_embeds[0]
    x = embed / embed.norm()
    weights = load_file(str(Path(head_dir) / HEAD_WEIGHTS))
    for index in (0, 2, 3):  # Linear(16,8), Dropout, Linear(8,4), Linear(4,1): LAION's indices
        x = x @ weights[f"layers.{index}.weight"].T + weights[f"layers.{index}.bias"]
    return float(x[0])


def test_images_and_videos_get_the_reference_score_and_audio_the_default(stage, probed, models) -> None:
    rows = run(stage, probed, models)
    visual = {p: r for p, r in rows.items() if r["modality"] in ("image", "video") and r["status"] == "ok"}
    assert {r["modality"] for r in visual.values()} == {"image", "video"}
    for relpath, row in visual.items():
        frame = key_frame(row, 48, 30.0)
        assert row["score_aesthetic"] == pytest.approx(reference_score(models, frame), abs=1e-4), relpath
    assert len({round(float(r["score_aesthetic"]), 6) for r in visual.values()}) > 1  # the content matters
    audio = [r for r in rows.values() if r["modality"] == "audio"]
    assert audio and all(r["score_aesthetic"] == 0.0 and r["status"] == "ok" for r in audio)
    assert (rows["empty.png"]["status"], rows["empty.png"]["stage"]) == ("rejected", "probe")


def test_default_threshold_keeps_all_and_min_aesthetic_filters_with_its_reason(stage, probed, models) -> None:
    scores = sorted(float(r["score_aesthetic"]) for r in run(stage, probed, models).values()
                    if r["modality"] == "image" and r["status"] == "ok")
    cut = (scores[0] + scores[1]) / 2
    rows = run(stage, probed, models, min_aesthetic=cut)
    low = [r for r in rows.values() if r["status"] == "filtered"]
    images_low = [r for r in low if r["modality"] == "image"]
    assert len(images_low) == 1 and images_low[0]["score_aesthetic"] == pytest.approx(scores[0])
    assert all((r["reason"], r["stage"]) == ("aesthetic_below_min", "score_aesthetic") for r in low)
    assert all(r["score_aesthetic"] < cut and f"< {cut}" in r["message"] for r in low)
    assert all(r["status"] == "ok" for r in rows.values() if r["modality"] == "audio")


def test_an_undecodable_video_costs_its_row_only(stage, models, tmp_path: Path) -> None:
    broken = tmp_path / "noise.mp4"
    broken.write_bytes(np.random.default_rng(0).bytes(4096))
    good = tmp_path / "plain.png"
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 30, 30)).save(good)
    base = {"status": "ok", "reason": "", "message": "", "stage": "", "width": 40, "height": 30, "clip_index": -1}
    batch = to_batch([{**base, "id": "a", "uri": str(broken), "relpath": "noise.mp4", "modality": "video"},
                      {**base, "id": "b", "uri": str(good), "relpath": "plain.png", "modality": "image"}])
    rows = run(stage, batch, models)
    assert (rows["noise.mp4"]["status"], rows["noise.mp4"]["reason"], rows["noise.mp4"]["stage"]) == (
        "rejected", "decode_error", "score_aesthetic")
    assert rows["plain.png"]["status"] == "ok" and rows["plain.png"]["score_aesthetic"] != 0.0


def test_a_clip_is_scored_on_its_own_middle_frame(probed) -> None:
    video = next(r for r in by_relpath(probed).values() if r["modality"] == "video")
    end = float(video["duration_s"]) / 2
    clip = {**video, "clip_index": 0, "clip_start_s": 0.0, "clip_end_s": end}
    expected, _ = decode_clip(video["uri"], 0.0, end, 1, (48, 48), timeout_s=30.0)
    np.testing.assert_array_equal(key_frame(clip, 48, 30.0), expected[0])
    assert not np.array_equal(key_frame(clip, 48, 30.0), decode_still(video, 48, 30.0))  # the shape moves


def test_head_keys_follow_laion_and_a_mismatched_head_is_refused(models, tmp_path: Path) -> None:
    assert list(build_head({}).state_dict()) == [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]
    assert json.loads((Path(models[1]) / HEAD_CONFIG).read_text())["input_dim"] == 16
    assert load_head(models[1]).layers[0].in_features == 16
    wide = save_head(build_head({**HEAD, "input_dim": 32}), {**HEAD, "input_dim": 32}, tmp_path / "wide")
    with pytest.raises(ValueError, match="32-dim embeddings"):
        ScoreAesthetic(types.SimpleNamespace(aesthetic=AestheticConfig(enabled=True, clip_model=models[0],
                                                                       head=str(wide)), decode_timeout_s=30.0))


def test_config_needs_a_head_when_enabled_and_resources_come_from_config() -> None:
    with pytest.raises(ValidationError, match="head: required when enabled"):
        CurationConfig.model_validate({"aesthetic": {"enabled": True}})
    assert ScoreAesthetic in STAGES and STAGES.index(ScoreAesthetic) == STAGES.index(
        next(s for s in STAGES if s.name == "filter_text_area")) + 1
    cfg = CurationConfig.model_validate({"aesthetic": {"enabled": True, "head": "some/head"},
                                         "resources": {"score_aesthetic": {"num_gpus": 1, "batch_size": 64}}})
    row = next(r for r in stage_graph(cfg) if "score_aesthetic" in r["stages"])
    assert row["stages"] == ["score_aesthetic"]  # on a GPU: a map of its own, apart from the CPU stages
    assert (row["num_gpus"], row["batch_size"]) == (1, 64)
    assert ScoreAesthetic.enabled(cfg) and not ScoreAesthetic.enabled(CurationConfig())  # off: no actor pool


def test_disabled_stage_loads_nothing_and_writes_the_default(probed) -> None:
    off = ScoreAesthetic(types.SimpleNamespace(aesthetic=AestheticConfig(min_aesthetic=100.0), decode_timeout_s=30.0))
    assert off.scorer is None
    rows = by_relpath(off({k: v.copy() for k, v in probed.items()}))
    assert all(r["score_aesthetic"] == 0.0 and r["status"] != "filtered" for r in rows.values())


def test_a_frame_the_model_fails_on_costs_its_row_only(stage, probed, models) -> None:
    from latentforge.pipelines.stages.score_aesthetic import score_key_frames

    def picky(frames: list[np.ndarray]) -> np.ndarray:  # fails on any batch holding a frame with a bright pixel
        if any(f.max() >= 240 for f in frames):
            raise RuntimeError("cannot score this frame")
        return np.full(len(frames), 3.0)

    stage.cfg = stage_cfg(models)
    rows = by_relpath(score_key_frames(stage, {k: v.copy() for k, v in probed.items()}, picky, "score_aesthetic", 48))
    visual = [r for r in rows.values() if r["modality"] in ("image", "video") and r["stage"] != "probe"]
    failed = [r for r in visual if r["status"] == "rejected"]
    assert failed and len(failed) < len(visual)
    assert all((r["reason"], r["stage"]) == ("stage_error", "score_aesthetic") and "cannot score" in r["message"]
               for r in failed)
    assert all(r["score_aesthetic"] == 3.0 for r in visual if r["status"] == "ok")


def test_loading_the_scorer_prints_no_image_processor_backend_warning(models) -> None:
    """transformers 5 warns once per process when `CLIPImageProcessor` is named without torchvision (every
    curation actor would print it); the scorer lets AutoImageProcessor choose the backend. A fresh process,
    because the warning is printed once per process and earlier tests in this one may have printed it."""
    import subprocess
    import sys

    clip, head = models
    code = ("import sys; from latentforge.pipelines.stages.score_aesthetic import AestheticConfig, AestheticScorer;"
            f"s = AestheticScorer(AestheticConfig(enabled=True, clip_model={clip!r}, head={head!r}));"
            "print(type(s.processor).__name__, s([__import__('numpy').zeros((40, 56, 3), 'uint8')]).shape)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0].startswith("CLIPImageProcessor") and done.stdout.split()[1] == "(1,)"
    assert "torchvision" not in done.stderr and "falling back" not in done.stderr, done.stderr
