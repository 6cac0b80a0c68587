"""The selection held column by column (training/entries.py): the same samples in the same order as one Python
object per sample gave, from several datasets, with any UTF-8 key, and no per-sample objects kept."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from latentforge.datasets import manifest as mf
from latentforge.datasets.manifest import Dataset
from latentforge.training.config import TrainStageConfig
from latentforge.training.entries import Entries, Entry, is_validation
from latentforge.training.loader import StreamPlan, select_entries

CARD = {"encoders": {}, "latent_stats": {"visual": {"mean": [0.0] * 4, "std": [1.0] * 4, "count": 1},
                                         "audio": {"mean": [0.0] * 8, "std": [1.0] * 8, "count": 1}}}


def manifest_only(root: Path, rows: list[dict]) -> Dataset:
    """A dataset's manifest and card (planning reads nothing else)."""
    root.mkdir(parents=True)
    mf.write_table(mf.to_table(rows, mf.MANIFEST_SCHEMA), root / mf.MANIFEST)
    (root / mf.CARD).write_text(json.dumps(CARD))
    return Dataset(root)


def rows_of(rng: np.random.Generator, keys: list[str]) -> list[dict]:
    kinds = {"image": [4, 1, 8, 8], "video": [4, 3, 8, 8], "audio": [8, 25, 1, 1]}
    out = []
    for key in keys:
        modality = str(rng.choice(list(kinds)))
        out.append({"id": key, "modality": modality, "latent_shape": kinds[modality], "status": "ok",
                    "shard": f"shard-{int(rng.integers(0, 5)):06d}-00.tar", "score_aesthetic": float(rng.random())})
    return out


def by_objects(datasets: list[Dataset], stage: TrainStageConfig, split: str) -> list[Entry]:
    """The selection as the loader built it before: one Entry per sample, sorted in Python."""
    out = []
    for n, ds in enumerate(datasets):
        for row in ds.select(stage.where, list(stage.modalities)).to_pylist():
            if is_validation(row["id"], stage.val_fraction) == (split == "val"):
                out.append(Entry(n, row["id"], str(ds.shard_path(row["shard"])), tuple(row["latent_shape"]),
                                 row["modality"]))
    return sorted(out, key=lambda e: (e.shard, e.key))


@pytest.mark.parametrize("split", ["train", "val"])
def test_the_columns_hold_what_one_object_per_sample_held(tmp_path: Path, split: str):
    rng = np.random.default_rng(0)
    keys = [f"s{i:04d}" for i in range(300)] + ["é-clip", "z", "Zürich", "日本", "a" * 40]
    one = manifest_only(tmp_path / "one", rows_of(rng, keys[:200]))
    two = manifest_only(tmp_path / "two", rows_of(rng, keys[200:]))
    stage = TrainStageConfig(name="s", modalities=["image", "audio"], where="score_aesthetic > 0.2",
                             val_fraction=0.2)
    entries = select_entries([one, two], stage, split)
    expected = by_objects([one, two], stage, split)
    assert 30 < len(expected) < 260 and {e.dataset for e in expected} == {0, 1}
    assert isinstance(entries, Entries) and list(entries) == expected
    assert [entries[i] for i in range(len(entries))] == expected  # element access too
    # nothing per sample but numpy arrays; the short lists hold the distinct values
    assert all(isinstance(a, np.ndarray) and a.dtype != object for a in (
        entries.dataset, entries.keys, entries.shard_index, entries.shape_index, entries.modality_index))
    assert len(entries.shards) <= 10 and len(entries.shapes) <= 2 and set(entries.modalities) <= {"image", "audio"}


def test_a_plan_over_entry_objects_equals_the_plan_over_columns(tmp_path: Path):
    ds = manifest_only(tmp_path / "d", rows_of(np.random.default_rng(1), [f"k{i:03d}" for i in range(120)]))
    stage = TrainStageConfig(name="s", modalities=["image", "video", "audio"], batch_size=4,
                             video_frames_as_images=True)
    columns = select_entries(ds, stage)
    objects = list(columns)
    for readers in (1, 3):
        a = StreamPlan(columns, stage, None, seed=7, readers=readers)
        b = StreamPlan(objects, stage, None, seed=7, readers=readers)
        assert all(a.plan(r, e) == b.plan(r, e) for r in range(readers) for e in range(2))
    taken = columns.take([5, 0, 9])
    assert list(taken) == [objects[5], objects[0], objects[9]] and Entries.of(taken) is taken


def test_empty_and_refused_selections(tmp_path: Path):
    ds = manifest_only(tmp_path / "d", rows_of(np.random.default_rng(2), ["a", "b"]))
    assert len(select_entries(ds, TrainStageConfig(name="s", modalities=["image"], where="score_aesthetic > 2"))) == 0
    assert len(select_entries(ds, TrainStageConfig(name="s", modalities=["image", "video", "audio"]), "val")) == 0
    bad = manifest_only(tmp_path / "bad", [{"id": "x", "modality": "image", "latent_shape": None, "status": "ok",
                                           "shard": "shard-000000-00.tar"}])
    with pytest.raises(ValueError, match="'x' has no latent_shape"):
        select_entries(bad, TrainStageConfig(name="s", modalities=["image"]))


def test_a_manifest_written_with_large_strings_and_doubles_plans_alike(tmp_path: Path):
    """pandas and polars write large_string (and float64): the columns come out the same."""
    import pyarrow as pa

    rows = rows_of(np.random.default_rng(4), [f"k{i:03d}" for i in range(60)])
    plain = manifest_only(tmp_path / "plain", rows)
    wide = manifest_only(tmp_path / "wide", rows)
    table = mf.read_table(wide.root / mf.MANIFEST)
    widened = pa.schema([f.with_type(pa.large_string() if f.type == pa.string() else f.type) for f in table.schema])
    mf.write_table(table.cast(widened), wide.root / mf.MANIFEST)
    assert mf.read_table(wide.root / mf.MANIFEST).schema.field("id").type == pa.large_string()
    stage = TrainStageConfig(name="s", modalities=["image", "video", "audio"])
    as_plain = [e._replace(shard=e.shard.replace("/wide/", "/plain/")) for e in select_entries(wide, stage)]
    assert as_plain == list(select_entries(plain, stage))
