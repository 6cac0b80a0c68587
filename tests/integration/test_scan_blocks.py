"""The scan's input dataset: one block per scan task, so the driver puts no more objects than tasks run."""
from __future__ import annotations

import numpy as np

from latentforge.pipelines.config import CurationConfig
from latentforge.pipelines.curate import SCAN_STAGES, input_dataset, plan
from latentforge.pipelines.stage import TASK_BATCH_ROWS


def rows(n: int) -> list[dict]:
    return [{"id": f"{i:08d}", "uri": f"/in/{i}.png", "relpath": f"{i}.png", "status": "ok", "shard": i // 64}
            for i in range(n)]


def test_the_scan_input_has_one_block_per_task(ray_local) -> None:
    def task_of(batch: dict) -> dict:  # nested: Ray's workers cannot import a test module
        return {"task": np.array([ray_local.get_runtime_context().get_task_id()] * len(batch["id"]))}

    cfg = CurationConfig()
    for n in (5_776, 900, 10, 1):
        (scan, *_), cpus = plan(SCAN_STAGES, cfg, n)
        assert cpus == 4
        per_task = scan.resources.batch_size  # tasks of up to TASK_BATCH_ROWS rows, 4 per CPU (tests/pipelines)
        ds = input_dataset(rows(n), cfg)
        assert ds.num_blocks() == max(1, n // per_task)
        # as the scan maps it: each task takes one block (a block one row short of a batch would make it take two)
        tasks = ds.map_batches(task_of, batch_size=per_task, batch_format="numpy").to_pandas()["task"]
        assert len(tasks) == n and tasks.nunique() == ds.num_blocks()
    (scan, *_), _ = plan(SCAN_STAGES, cfg, 100_000)
    assert scan.resources.batch_size == TASK_BATCH_ROWS
    assert input_dataset(rows(100_000), cfg).num_blocks() == 100_000 // TASK_BATCH_ROWS  # not 12,500 blocks of 8


def test_whole_group_blocks_end_at_group_boundaries_and_stay_whole_through_the_scan(ray_local) -> None:
    """What lets the last stage map write the shards: no shard group spans two blocks, before or after a map."""
    def scanned(batch: dict) -> dict:  # a map as the scan's, cutting its task's rows into batches
        return {"shard": batch["shard"]}

    def groups_per_block(ds) -> list[list[int]]:
        return [sorted({int(s) for s in b["shard"]}) for b in ds.iter_batches(batch_size=None, batch_format="numpy")]

    cfg = CurationConfig()
    for n, per_shard in ((900, 64), (900, 7), (5_776, 64), (300, 1000), (10, 3)):
        inputs = [{**r, "shard": i // per_shard} for i, r in enumerate(rows(n))]
        (scan, *_), _ = plan(SCAN_STAGES, cfg, n)
        per_task = scan.resources.batch_size
        ds = input_dataset(inputs, cfg, whole_groups=True)
        groups = sorted({r["shard"] for r in inputs})
        blocks = groups_per_block(ds)
        assert sorted(g for b in blocks for g in b) == groups  # no group in two blocks
        sizes = [sum(1 for r in inputs if r["shard"] in set(b)) for b in blocks]
        assert all(s >= min(per_task, per_shard) for s in sizes[:-1])  # a batch, or one group larger than it
        after = groups_per_block(ds.map_batches(scanned, batch_size=per_task, batch_format="numpy").materialize())
        assert sorted(g for b in after for g in b) == groups  # still none after a map
