"""`verify` on a dataset written by the real writer: clean passes, each kind of damage is reported."""
from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from latentforge.datasets import manifest as mf
from latentforge.datasets.shards import LatentSample, LatentShardWriter, sha256_file
from latentforge.datasets.verify import verify_dataset


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "ds"
    rng = np.random.default_rng(0)
    rows, shards = [], []
    for s in range(2):
        name = f"shard-{s:06d}-00.tar"
        with LatentShardWriter(root / mf.SHARDS / name) as w:
            for i in range(3):
                key = f"s{s}{i}"
                w.write_sample(LatentSample(key, rng.normal(size=(12, 1, 4, 4)).astype(np.float32),
                                            np.zeros((8, 16), np.float32), np.ones(8, bool), f"cap {key}",
                                            {"modality": "image"}))
                rows.append({"id": key, "modality": "image", "latent_shape": [12, 1, 4, 4], "caption": f"cap {key}",
                             "shard": name, "status": "ok"})
        shards.append({"name": name, "sha256": sha256_file(root / mf.SHARDS / name), "count": 3})
    mf.write_table(mf.to_table(rows, mf.MANIFEST_SCHEMA), root / mf.MANIFEST)
    mf.write_table(mf.to_table([], mf.REJECTS_SCHEMA), root / mf.REJECTS)
    card = {"num_samples": 6, "shards": shards, "encoders": {"text": {"dim": 16, "max_len": 8}}}
    (root / mf.CARD).write_text(json.dumps(card))
    return root


def test_clean_dataset_verifies(dataset):
    report = verify_dataset(dataset)
    assert report.ok, report.problems
    assert report.checked == {"shards": 2, "samples": 6}


def test_flipped_byte_is_a_checksum_problem(dataset):
    path = dataset / mf.SHARDS / "shard-000000-00.tar"
    data = bytearray(path.read_bytes())
    data[2000] ^= 0xFF
    path.write_bytes(bytes(data))
    assert any("sha256" in p and "shard-000000-00" in p for p in verify_dataset(dataset).problems)


def test_truncated_shard_is_reported_with_missing_samples(dataset):
    path = dataset / mf.SHARDS / "shard-000001-00.tar"
    path.write_bytes(path.read_bytes()[:3000])
    problems = verify_dataset(dataset).problems
    assert any("corrupt or truncated" in p for p in problems)
    assert any("s12 is missing" in p for p in problems)


def test_missing_shard_and_count_mismatch(dataset):
    (dataset / mf.SHARDS / "shard-000001-00.tar").unlink()
    card = json.loads((dataset / mf.CARD).read_text())
    card["num_samples"] = 7
    (dataset / mf.CARD).write_text(json.dumps(card))
    problems = verify_dataset(dataset).problems
    assert "shard-000001-00.tar: missing" in problems
    assert any("card says 7 samples" in p for p in problems)


def test_a_pickle_member_makes_the_shard_unreadable(dataset, tmp_path):
    path = dataset / mf.SHARDS / "shard-000000-00.tar"
    evil = tmp_path / "s00.obj.pyd"
    evil.write_bytes(b"\x80\x04K\x01.")
    with tarfile.open(path, "a") as tar:
        tar.add(evil, arcname="s00.obj.pyd")
    problems = verify_dataset(dataset).problems
    assert any("obj.pyd" in p for p in problems)


def test_shape_mismatch_against_manifest(dataset):
    table = mf.Dataset(dataset).manifest().to_pylist()
    table[0]["latent_shape"] = [12, 2, 4, 4]
    mf.write_table(mf.to_table(table, mf.MANIFEST_SCHEMA), dataset / mf.MANIFEST)
    assert any("manifest says [12, 2, 4, 4]" in p for p in verify_dataset(dataset).problems)


# --- a trained stage's lineage -------------------------------------------------------------------------------

def test_a_stages_lineage_verifies_while_its_shards_stay_and_names_the_one_that_changed(dataset, tmp_path):
    """lineage.json as a stage records it (stage_lineage: the shards its selection read): intact, then the
    dataset grown (new card id, the stage's shards untouched) passes with a note, then a shard the stage read
    rewritten, and one removed, are problems."""
    from typer.testing import CliRunner

    from latentforge.datasets.verify import verify_lineage
    from latentforge.orchestration.cli import app
    from latentforge.training.config import TrainStageConfig
    from latentforge.training.loader import stage_lineage

    card = json.loads((dataset / mf.CARD).read_text())
    (dataset / mf.CARD).write_text(json.dumps({**card, "id": "demo-aaaa"}))
    stage = TrainStageConfig(name="finetune", modalities=["image"], where="id != 's10'")
    lineage = stage_lineage(mf.Dataset(dataset), stage)
    assert [s["name"] for s in lineage["datasets"][0]["shards"]] == ["shard-000000-00.tar", "shard-000001-00.tar"]
    report = verify_lineage(lineage)
    assert report.ok and report.checked == {"shards": 2, "datasets": 1} and not report.notes

    (dataset / mf.CARD).write_text(json.dumps({**card, "id": "demo-bbbb"}))  # grown: a new version, same shards
    report = verify_lineage(lineage)
    assert report.ok and report.notes == [f"{dataset} is now dataset demo-bbbb; the stage read demo-aaaa (grown "
                                          "or curated again since): checking the shards it read"]

    export = tmp_path / "export"
    export.mkdir()
    (export / "lineage.json").write_text(json.dumps(lineage))
    assert CliRunner().invoke(app, ["verify", str(export)]).exit_code == 0
    shard = dataset / mf.SHARDS / "shard-000001-00.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    (dataset / mf.SHARDS / "shard-000000-00.tar").unlink()
    problems = verify_lineage(lineage).problems
    assert problems[0] == f"demo-aaaa: shard shard-000000-00.tar is missing from {dataset}"
    assert problems[1].startswith("demo-aaaa: shard shard-000001-00.tar changed since the stage read it")
    result = CliRunner().invoke(app, ["verify", str(export / "lineage.json")])
    assert result.exit_code == 1 and "2 problem(s)" in result.output and "note" in result.output
