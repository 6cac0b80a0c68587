"""`select`: a child dataset from the manifest alone; verify accepts it; training sees only the selection."""
from __future__ import annotations

import json

import numpy as np
import pytest

from latentforge.datasets import manifest as mf
from latentforge.datasets.select import select_dataset
from latentforge.datasets.shards import LatentSample, LatentShardWriter, iter_shards, sha256_file
from latentforge.datasets.verify import verify_dataset


@pytest.fixture
def parent(tmp_path):
    root = tmp_path / "parent"
    rng = np.random.default_rng(0)
    rows, shards = [], []
    for s in range(3):
        name = f"shard-{s:06d}-00.tar"
        with LatentShardWriter(root / mf.SHARDS / name) as w:
            for i in range(4):
                key, modality = f"s{s}{i}", "image" if i % 2 else "video"
                w.write_sample(LatentSample(key, rng.normal(size=(12, 1, 4, 4)).astype(np.float32),
                                            np.zeros((8, 16), np.float32), np.ones(8, bool), "c", {"modality": modality}))
                rows.append({"id": key, "source_id": key, "modality": modality, "latent_shape": [12, 1, 4, 4],
                             "caption": "c", "shard": name, "status": "ok", "bucket": "1x8x8",
                             "score_motion": float(s * 4 + i)})
        shards.append({"name": name, "sha256": sha256_file(root / mf.SHARDS / name), "count": 4})
    mf.write_table(mf.to_table(rows, mf.MANIFEST_SCHEMA), root / mf.MANIFEST)
    mf.write_table(mf.to_table([], mf.REJECTS_SCHEMA), root / mf.REJECTS)
    card = {"id": "demo-parent", "name": "demo", "num_samples": 12, "shards": shards,
            "encoders": {"text": {"dim": 16, "max_len": 8}}, "latent_stats": {}}
    (root / mf.CARD).write_text(json.dumps(card))
    return root


def test_selection_writes_a_verifiable_child_with_lineage(parent, tmp_path):
    child = tmp_path / "child"
    card = select_dataset(parent, child, "score_motion >= 6 and modality == 'image'")
    chosen = mf.Dataset(child).manifest()["id"].to_pylist()
    assert chosen == ["s13", "s21", "s23"]  # score = 4 * shard + index; odd indices are images
    assert card["parents"] == ["demo-parent"] and card["selection"]["parent"] == "demo-parent"
    assert card["num_samples"] == 3 and card["id"] != "demo-parent"
    assert [s["name"] for s in card["shards"]] == ["shard-000001-00.tar", "shard-000002-00.tar"]
    assert [s["count"] for s in card["shards"]] == [1, 2] and all(s["total"] == 4 for s in card["shards"])
    rejects = mf.Dataset(child).rejects().to_pylist()
    assert len(rejects) == 9 and {r["reason"] for r in rejects} == {"not_selected"}  # every parent row accounted
    assert verify_dataset(child).ok, verify_dataset(child).problems
    # shards are the parent's bytes (hard links), not rewritten
    assert sha256_file(child / mf.SHARDS / "shard-000001-00.tar") == card["shards"][0]["sha256"]


def test_training_reads_only_the_selected_samples(parent, tmp_path):
    from latentforge.training.config import TrainStageConfig
    from latentforge.training.loader import LatentNormalizer, load_batches, select_samples

    select_dataset(parent, tmp_path / "child", "score_motion < 3")
    stage = TrainStageConfig(name="s", modalities=["image", "video"], steps=1)
    child = mf.Dataset(tmp_path / "child")
    keys = [key for _, key in select_samples(child, stage)[1]]
    stats = {"visual": {"mean": [0.0] * 12, "std": [1.0] * 12}}  # this card has none; the loader normalises
    batches = load_batches(child, stage, LatentNormalizer({"latent_stats": stats}))
    assert sum(len(b.captions) for b in batches) == 3  # the loader reads exactly the selected samples
    assert keys == ["s00", "s01", "s02"]
    assert len(list(iter_shards([tmp_path / "child" / mf.SHARDS / "shard-000000-00.tar"]))) == 4


def test_empty_selection_and_existing_output_are_refused(parent, tmp_path):
    with pytest.raises(ValueError, match="matches no sample"):
        select_dataset(parent, tmp_path / "none", "score_motion > 100")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(FileExistsError):
        select_dataset(parent, tmp_path / "busy", None, ["image"])


def test_cli_select(parent, tmp_path):
    from typer.testing import CliRunner

    from latentforge.orchestration.cli import app

    result = CliRunner().invoke(app, ["select", str(parent), "--out", str(tmp_path / "c"), "--where",
                                      "score_motion > 9"])
    assert result.exit_code == 0, result.output
    assert "selected 2 samples" in result.output
    bad = CliRunner().invoke(app, ["select", str(parent), "--out", str(tmp_path / "d"), "--where", "nope > 1"])
    assert bad.exit_code == 2 and "unknown column" in bad.output
