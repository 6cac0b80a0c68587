"""Curation on a real local Ray with the captioners on (tiny BLIP + tiny Whisper loaded by local directory):
generated captions per kept row, sidecar captions kept beside them, cleaning applied, every input accounted for."""
from __future__ import annotations

import json

import pytest
from tiny_captioners import save_tiny_blip, save_tiny_whisper

from latentforge.datasets.demo_corpus import DemoCorpusSpec, generate_demo_corpus
from latentforge.datasets.manifest import Dataset
from latentforge.pipelines.config import CurationConfig
from latentforge.pipelines.curate import run_curation

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.heavy, pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")]
CPU = {"device": "cpu", "dtype": "float32"}
SIDECAR_CASES = {"broken/missing_caption.png": "missing_caption", "broken/bad_caption.png": "caption_not_utf8"}


@pytest.fixture(scope="module")
def curated(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("corpus")
    index = generate_demo_corpus(root, DemoCorpusSpec(num_images=2, num_videos=2, num_audio=2, seed=11))
    models = tmp_path_factory.mktemp("captioners")
    cfg = CurationConfig.model_validate({
        "name": "captioned", "input_dir": str(root), "samples_per_shard": 8, "audio_seconds": 0.25,
        "captioning": {
            # BLIP continues the prompt and echoes it: cleaning must strip it again
            "vlm": {"enabled": True, "model": save_tiny_blip(models / "blip"), "prompt": "a picture of",
                    "image_size": 32, "frames": 2, "max_new_tokens": 6, "min_new_tokens": 2, "num_beams": 1, **CPU},
            "audio": {"enabled": True, "model": save_tiny_whisper(models / "whisper"), "max_seconds": 2.0,
                      "max_new_tokens": 6, **CPU}},
        "resources": {name: {"num_cpus": 0.25, "batch_size": 4, "pool": 1}
                      for name in ("caption_prep", "caption_vlm", "caption_audio", "caption_select")}})
    out = tmp_path_factory.mktemp("dataset")
    result = run_curation(cfg, out)
    return index, result, Dataset(out)


def test_every_kept_row_has_its_generated_caption(curated) -> None:
    _, result, ds = curated
    rows = ds.manifest().to_pylist()
    assert result.kept == len(rows) > 0 and {r["modality"] for r in rows} == {"image", "video", "audio"}
    for row in rows:
        column = "caption_audio" if row["modality"] == "audio" else "caption_generated"
        text = row[column]
        assert isinstance(text, str) and text.strip(), (row["relpath"], column)
        assert not text.lower().startswith("a picture of"), text  # cleaned
        assert row["caption"] and row["caption_origin"] in {"sidecar", "vlm", "audio"}
        assert row["score_caption_words"] == len(row["caption"].split())


def test_sidecar_captions_are_preserved_and_preferred(curated) -> None:
    index, _, ds = curated
    captions = {e["path"]: e["caption"] for e in index["files"]}
    rows = {r["relpath"]: r for r in ds.manifest().to_pylist()}
    with_sidecar = [p for p in rows if captions.get(p)]
    assert len(with_sidecar) >= 6
    for relpath in with_sidecar:
        row = rows[relpath]
        assert row["caption_sidecar"] == row["caption"] == captions[relpath]
        assert row["caption_origin"] == "sidecar"


def test_rows_without_a_usable_sidecar_take_the_vlm_caption(curated) -> None:
    _, _, ds = curated
    rows = {r["relpath"]: r for r in ds.manifest().to_pylist()}
    rejects = {r["relpath"]: r for r in ds.rejects().to_pylist()}
    for relpath, reason in SIDECAR_CASES.items():
        if relpath not in rows:  # the two files hold the same pixels: dedup keeps one of them
            assert "duplicate" in rejects[relpath]["reason"], rejects[relpath]
            continue
        row = rows[relpath]  # kept: with a captioner on, a missing sidecar no longer rejects
        assert row["caption_origin"] == "vlm" and row["caption"] == row["caption_generated"]
        assert row["caption_sidecar"] == "" and reason in row["caption_error"]
    assert any(relpath in rows for relpath in SIDECAR_CASES)


def test_rejects_are_recorded_and_every_input_accounted_for(curated) -> None:
    index, result, ds = curated
    rejects = {r["relpath"]: r for r in ds.rejects().to_pylist()}
    kept = {r["relpath"] for r in ds.manifest().to_pylist()}
    for entry in index["files"]:
        if entry["expect"] == "rejected" and entry["path"] not in SIDECAR_CASES:
            assert rejects[entry["path"]]["reason"], entry["path"]
        if entry["expect"] == "kept":
            assert entry["path"] in kept, entry["path"]
    assert result.samples == len(kept) + len(rejects)
    assert not any(r["stage"] in ("caption_vlm", "caption_audio") for r in rejects.values())
    card = json.loads((ds.root / "card.json").read_text())
    assert card["config"]["captioning"]["vlm"]["enabled"] is True
