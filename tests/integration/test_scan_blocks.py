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
