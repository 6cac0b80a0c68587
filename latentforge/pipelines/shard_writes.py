"""Who writes the shard tars, and the driver's side of it (see CurationConfig.shard_writes).

With `workers`, the last stage map's chain ends with `write_finished_groups` (stages/write_shards.py) and only
metadata rows stream here; with `driver`, every row does and `write_groups` writes each group once all its rows
are in. Either way `write_groups` consumes the job's rows and writes whatever reached it in pieces.
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from latentforge.datasets import storage
from latentforge.pipelines import meta as mt
from latentforge.pipelines.config import CurationConfig
from latentforge.pipelines.discover import group_sizes
from latentforge.pipelines.stage import TIMING_COLUMN, add_timing, batch_of, num_rows
from latentforge.pipelines.stages.write_shards import WRITTEN, write_shard_group


def writes_in_workers(cfg: CurationConfig, shard_dir: Path | str) -> bool:
    """Whether the last stage map's workers write the shards (see CurationConfig.shard_writes): with `auto`,
    when the shard directory is a URI, which every worker reaches. A local path may be one node's disk, and on
    one machine the driver's writes cost no more: 70.4-73.6 s against 74.0-75.9 s for the job at 5,776
    samples on 2 cores (BENCHMARKS.md), where the workers' whole blocks deliver their first rows later."""
    if cfg.shard_writes != "auto":
        return cfg.shard_writes == "workers"
    return storage.is_remote(shard_dir)


def write_groups(ds, rows: pa.Table | list[dict], writer_args: dict, in_flight: int = 2,
                 seconds: dict[str, float] | None = None, stage_seconds: dict[str, list[float]] | None = None,
                 written: dict[str, int] | None = None, by_rows: bool = False) -> pa.Table:
    """Stream the pipeline's rows and write each shard group as soon as all its rows are in; returns the
    groups' metadata rows (latents left in the tars) as one table (meta.py).

    Groups are written while the pipeline goes on, so the first groups are on disk (with their done-markers,
    for resume) long before the last input is decoded. Not `groupby("shard")`: that is a hash shuffle, a
    barrier after the last stage (nothing written until everything is encoded) whose aggregator actors cost
    seconds to start on a small machine. Written by `in_flight` threads of this process, not Ray tasks: every
    row already streams through here, and a task would send it back through the object store to a worker.

    `writer_args`: write_shard_group's keywords (shard_dir, max_bytes, config_hash).
    A group is complete when each of its inputs has sent `source_rows` rows (its clips, or one row), or with
    `by_rows` (readmission, whose `rows` are the rows to come, single clips among them) when as many rows as
    `rows` assigns to it have come. Rows
    that come WRITTEN (the last map's workers wrote their group: build_pipeline's `writer_args`) only add
    their metadata; the threads write what the workers could not (a group split across blocks), and
    everything when the workers write nothing. `written` gets how many groups each wrote.
    `seconds` gets the wall time to the first row (actors starting, models loading) and from there to the end;
    `stage_seconds` the rows' time per stage (stage -> [cpu_s, wall_s]; see stage.TIMING_COLUMN).
    """
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    inputs = group_sizes(rows)  # inputs per group
    pending: dict[int, list[dict]] = {}
    rows_left: dict[int, dict[str, int]] = {}  # group -> source id -> rows still to come
    finished: Counter = Counter()  # group -> inputs whose rows are all in
    futures, meta = set(), mt.Collector()
    timing = {} if stage_seconds is None else stage_seconds
    by_workers: set[int] = set()
    on_driver: list[int] = []

    def drain(keep: int) -> None:
        nonlocal futures
        while len(futures) > keep:
            done, futures = wait(futures, return_when=FIRST_COMPLETED)
            for future in done:
                meta.add_batch(future.result())

    with ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="lf-shard-writer") as pool:
        def write(group: int) -> None:
            on_driver.append(group)
            futures.add(pool.submit(write_shard_group, batch_of(pending.pop(group)), **writer_args))
            drain(in_flight)

        start = time.perf_counter()
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            if seconds is not None and "first_row" not in seconds:
                seconds["first_row"] = time.perf_counter() - start
            n = num_rows(batch)
            for value in batch.pop(TIMING_COLUMN, ()):
                add_timing(timing, {TIMING_COLUMN: value})
            done_here = np.asarray(batch.pop(WRITTEN, np.zeros(n, bool)), dtype=bool)
            if done_here.any():  # their groups are in their tars already (write_finished_groups)
                meta.add_batch(batch, np.flatnonzero(done_here))
                by_workers.update(int(g) for g in np.unique(batch["shard"][done_here]))
            for i in np.flatnonzero(~done_here).tolist():
                row = {k: v[i] for k, v in batch.items()}
                group, source = int(row["shard"]), str(row["source_id"])
                pending.setdefault(group, []).append(row)
                if by_rows:
                    if len(pending[group]) == inputs[group]:
                        write(group)
                    continue
                left = rows_left.setdefault(group, {})
                left[source] = left.get(source, int(row["source_rows"])) - 1
                if left[source] == 0:
                    finished[group] += 1
                    if finished[group] == inputs[group]:
                        write(group)
        for group in sorted(pending):  # never complete (source_rows disagreed): written with what came, checked
            write(group)
        drain(0)
    if written is not None:
        written.update({"workers": len(by_workers), "driver": len(on_driver)})
    if seconds is not None:
        seconds["stages"] = time.perf_counter() - start - seconds.get("first_row", 0.0)
    return meta.table()
