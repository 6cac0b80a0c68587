"""What a rank holds to plan its batches: the stage's selection as numpy columns vs one Python object per sample.

    .venv/bin/python bench/plan_memory.py [--samples 1000000] [--dir /tmp/lf-plan-bench]

Writes a manifest of `--samples` rows (ids like the curation's, 2,000 per shard, a quarter videos; planning reads
nothing else) once, then in one process: the previous selection (the manifest's columns as Python lists, an
`Entry` per sample, sorted in Python; copied below as the baseline) and `select_entries` as it is now
(`training/entries.py`). For each: seconds, the Python heap it keeps (tracemalloc, after a collection) and its
peak while building, and that both give the same samples in the same order. Every rank holds this selection for
the whole run, and each DataLoader worker forked from it copies whatever pages of Python objects it touches.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa

from latentforge.datasets import manifest as mf
from latentforge.datasets.manifest import Dataset
from latentforge.training.config import TrainStageConfig
from latentforge.training.entries import Entry, is_validation
from latentforge.training.loader import select_entries


def write_manifest(root: Path, n: int) -> Dataset:
    if not (root / mf.MANIFEST).is_file():
        root.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        video = np.arange(n) % 4 == 3
        columns = {f.name: pa.nulls(n, f.type) for f in mf.MANIFEST_SCHEMA}
        columns.update(
            id=pa.array([f"s{v:016x}" for v in rng.integers(0, 2**62, n)]),
            shard=pa.array([f"shard-{i // 2000:06d}-00.tar" for i in range(n)]),
            modality=pa.array(np.where(video, "video", "image").tolist()), status=pa.array(["ok"] * n),
            latent_shape=pa.array([[4, 4, 32, 32] if v else [4, 1, 32, 32] for v in video.tolist()],
                                  mf.MANIFEST_SCHEMA.field("latent_shape").type))
        mf.write_table(pa.table(columns, schema=mf.MANIFEST_SCHEMA), root / mf.MANIFEST)
        (root / mf.CARD).write_text(json.dumps({"encoders": {}, "latent_stats": {}}))
    return Dataset(root)


def previous_select(datasets: list[Dataset], stage: TrainStageConfig, split: str = "train") -> list[Entry]:
    """The selection as it was built before: an Entry per sample (baseline)."""
    out = []
    for n, dataset in enumerate(datasets):
        table = dataset.select(stage.where, list(stage.modalities))
        columns = [table[c].to_pylist() for c in ("id", "shard", "latent_shape", "modality")]
        shard_paths: dict[str, str] = {}
        for key, shard, shape, modality in zip(*columns):
            if is_validation(key, stage.val_fraction) != (split == "val"):
                continue
            if shard not in shard_paths:
                shard_paths[shard] = str(dataset.shard_path(shard))
            out.append(Entry(n, key, shard_paths[shard], tuple(shape), modality))
    out.sort(key=lambda e: (e.shard, e.key))
    return out


def measured(build) -> tuple[object, dict]:
    """Seconds of one build, then the Python heap another build keeps and peaks at (tracemalloc slows it)."""
    gc.collect()
    t0 = time.perf_counter()
    build()
    seconds = time.perf_counter() - t0
    gc.collect()
    tracemalloc.start()
    held = build()
    gc.collect()
    kept, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return held, {"s": round(seconds, 2), "held_mb": round(kept / 1e6, 1), "peak_mb": round(peak / 1e6, 1)}


def digest(entries) -> str:
    h = hashlib.sha256()
    for entry in entries:
        h.update(repr(tuple(entry)).encode())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/lf-plan-bench"))
    args = parser.parse_args()
    ds = write_manifest(args.dir / str(args.samples), args.samples)
    stage = TrainStageConfig(name="s", modalities=["image", "video"])
    ds.select(None, ["image"])  # warm the file cache for both
    before, previous = measured(lambda: previous_select([ds], stage))
    expected = digest(before)
    del before
    now, columns = measured(lambda: select_entries([ds], stage))
    if digest(now) != expected:
        raise SystemExit("the two selections differ")
    print(json.dumps({"samples": args.samples, "previous_entry_objects": previous, "numpy_columns": columns,
                      "held_ratio": round(previous["held_mb"] / max(columns["held_mb"], 0.1), 1)}))


if __name__ == "__main__":
    main()
