"""Who writes the shards: the last stage map's workers (each block's whole groups, no latent reaching the driver)
or the driver. Both give the same dataset, byte for byte; a group split across blocks is finished by the driver."""
from __future__ import annotations

import filecmp
import json

import numpy as np

from latentforge.datasets import manifest as mf
from latentforge.datasets.demo_corpus import DemoCorpusSpec, generate_demo_corpus
from latentforge.datasets.shards import iter_shards, npy_bytes
from latentforge.pipelines.config import CurationConfig
from latentforge.pipelines.curate import run_curation
from latentforge.pipelines.shard_writes import write_groups, writes_in_workers
from latentforge.pipelines.stage import batch_of, rows_of
from latentforge.pipelines.stages.write_shards import HEAVY, write_finished_groups


def test_workers_and_driver_write_the_same_dataset(ray_local, tmp_path) -> None:
    corpus = tmp_path / "corpus"
    generate_demo_corpus(corpus, DemoCorpusSpec(num_images=16, num_videos=4, num_audio=4, seed=5))
    results = {}
    for mode in ("workers", "driver"):
        cfg = CurationConfig(input_dir=corpus, samples_per_shard=4, shard_writes=mode)
        results[mode] = run_curation(cfg, tmp_path / mode)
    workers, driver = results["workers"], results["driver"]
    groups = -(-workers.inputs // 4)
    assert workers.groups_written == {"workers": groups, "driver": 0}
    assert driver.groups_written == {"workers": 0, "driver": groups}
    assert "write_shards" in workers.stage_seconds and "write_shards" not in driver.stage_seconds
    assert workers.card["id"] == driver.card["id"] and workers.kept == driver.kept > 0
    for table in (mf.MANIFEST, mf.REJECTS):
        a = mf.read_table(tmp_path / "workers" / table).to_pylist()
        b = mf.read_table(tmp_path / "driver" / table).to_pylist()
        assert a == b
    tars = sorted(p.name for p in (tmp_path / "workers" / mf.SHARDS).glob("*.tar"))
    assert tars == sorted(p.name for p in (tmp_path / "driver" / mf.SHARDS).glob("*.tar")) and tars
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "workers" / mf.SHARDS, tmp_path / "driver" / mf.SHARDS, tars,
                                           shallow=False)
    assert not mismatch and not errors
    # auto: the workers when the output is a URI every worker reaches, else the driver
    assert writes_in_workers(CurationConfig(), "s3://bucket/ds/shards") and not writes_in_workers(
        CurationConfig(), tmp_path)
    assert writes_in_workers(CurationConfig(shard_writes="workers"), tmp_path)
    assert not writes_in_workers(CurationConfig(shard_writes="driver"), "s3://bucket/ds/shards")


def sample(source: str, clip: int, clips: int, group: int) -> dict:
    return {"id": f"{source}-c{clip}", "source_id": source, "source_rows": clips, "shard": group, "status": "ok",
            "latent": npy_bytes(np.full((4, 1, 4, 4), clip, np.float32)),
            "text_emb": npy_bytes(np.zeros((4, 8), np.float16)), "text_mask": npy_bytes(np.ones(4, bool)),
            "caption": "a caption", "relpath": f"{source}.mp4", "modality": "video", "width": 8, "height": 8,
            "num_frames": 4, "fps": 8.0, "duration_s": 0.5, "sample_rate": 0, "bucket": "4x16x16"}


def test_the_driver_finishes_a_group_split_across_blocks(ray_local, tmp_path) -> None:
    # group 0 (inputs a, b) whole in the first block; group 1 (input c, 3 clips) split across both blocks
    first = [sample("a", 0, 1, 0), sample("b", 0, 1, 0), sample("c", 0, 3, 1)]
    second = [sample("c", 1, 3, 1), sample("c", 2, 3, 1)]
    inputs = {0: 2, 1: 1}
    shards = tmp_path / "shards"
    blocks = [write_finished_groups(batch_of(rows), inputs, str(shards), 2**30, None) for rows in (first, second)]
    ds = ray_local.data.from_items([r for b in blocks for r in rows_of(b)], override_num_blocks=2)
    written: dict[str, int] = {}
    args = {"shard_dir": str(shards), "max_bytes": 2**30, "config_hash": None}
    meta = write_groups(ds, [{"shard": 0}, {"shard": 0}, {"shard": 1}], args, written=written).to_pylist()
    assert written == {"workers": 1, "driver": 1}
    assert sorted(m["id"] for m in meta) == ["a-c0", "b-c0", "c-c0", "c-c1", "c-c2"]
    assert all(not set(HEAVY) & set(m) and m["shard_name"] for m in meta)
    keys = {p.name: [s.key for s in iter_shards([p])] for p in shards.glob("*.tar")}
    assert keys == {"shard-000000-00.tar": ["a-c0", "b-c0"], "shard-000001-00.tar": ["c-c0", "c-c1", "c-c2"]}
    json.dumps(meta, default=str)
