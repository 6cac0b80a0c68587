"""The scan's input dataset: one block per scan task, so the driver puts no more objects than tasks run."""
from __future__ import annotations

from latentforge.pipelines.config import CurationConfig
from latentforge.pipelines.curate import SCAN_STAGES, input_dataset, plan
from latentforge.pipelines.stage import TASK_BATCH_ROWS


def rows(n: int) -> list[dict]:
    return [{"id": f"{i:08d}", "uri": f"/in/{i}.png", "relpath": f"{i}.png", "status": "ok", "shard": i // 64}
            for i in range(n)]


def test_the_scan_input_has_one_block_per_task(ray_local) -> None:
    cfg = CurationConfig()
    for n in (100_000, 900, 10, 1):
        (scan, *_), cpus = plan(SCAN_STAGES, cfg, n)
        assert cpus == 4
        per_task = scan.resources.batch_size  # tasks of up to TASK_BATCH_ROWS rows, 4 per CPU (tests/pipelines)
        assert per_task == TASK_BATCH_ROWS or n < 100_000
        ds = input_dataset(rows(n), cfg)
        assert ds.num_blocks() == -(-n // per_task)
        assert ds.count() == n
    assert input_dataset(rows(100_000), cfg).num_blocks() == 782  # not 12,500 blocks of 8 rows
