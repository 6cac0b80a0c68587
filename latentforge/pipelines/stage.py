"""The Stage shape: a plain callable over columnar batches that declares its Ray Data resources."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from latentforge.datasets.media import worker_threads
from latentforge.pipelines.resources import StageResources
from latentforge.pipelines.staging import BatchCopies, StagedRow, chain_copies, current_copies, staged_row

if TYPE_CHECKING:
    from latentforge.pipelines.config import CurationConfig

Batch = dict[str, np.ndarray]


class Reject(Exception):
    """Raised for one row: the sample leaves the pipeline with this reason (status `rejected` or `filtered`)."""

    def __init__(self, reason: str, message: str, status: str = "rejected"):
        super().__init__(message)
        self.reason, self.message, self.status = reason, message, status


class Stage:
    """A Ray Data step: `__init__` loads what it needs once per actor, `__call__(batch) -> batch`."""

    name: ClassVar[str]
    resources: ClassVar[StageResources] = StageResources()
    # New columns and the value they take on rows this stage does not process (so column types stay uniform).
    outputs: ClassVar[dict[str, Any]] = {}

    def __init__(self, cfg: CurationConfig):
        self.cfg = cfg

    def __call__(self, batch: Batch) -> Batch:
        return map_ok_rows(batch, self.process_row, self.outputs, self.name)

    def process_row(self, row: dict) -> dict:
        raise NotImplementedError


def num_rows(batch: Batch) -> int:
    return len(next(iter(batch.values()))) if batch else 0


def mark_row(batch: Batch, i: int, stage: str, status: str, reason: str, message: str) -> None:
    """Row `i` of `batch` leaves the pipeline at `stage` (status `rejected` or `filtered`) with this reason."""
    batch["status"][i], batch["reason"][i], batch["message"][i], batch["stage"][i] = status, reason, message, stage


def error_message(error: BaseException) -> str:
    """The `message` of a row a stage's unforeseen error cost (reason `stage_error`)."""
    return f"{type(error).__name__}: {error}"


def rows_of(batch: Batch) -> list[dict]:
    n = num_rows(batch)
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def batch_of(rows: list[dict]) -> Batch:
    """The inverse of rows_of: one numpy object column per key of the first row, as Ray Data hands a stage."""
    batch = {}
    for key in rows[0]:
        column = np.empty(len(rows), dtype=object)
        for i, row in enumerate(rows):  # element-wise: a list of equal-shape arrays must not broadcast
            column[i] = row[key]
        batch[key] = column
    return batch


def map_ok_rows(batch: Batch, fn: Callable[[dict], dict], outputs: dict[str, Any], stage: str) -> Batch:
    """Apply `fn` to each row still `ok`; a `Reject` marks that row and the rest go on."""
    chain = current_copies()
    copies = chain if chain is not None else BatchCopies()
    rows = [staged_row(r, copies) for r in rows_of(batch)]
    new = {name: [default] * len(rows) for name, default in outputs.items()}
    status, reason, message, where = (list(batch[c]) for c in ("status", "reason", "message", "stage"))
    try:
        for i, row in enumerate(rows):
            try:
                if row["status"] != "ok":
                    continue
                for name, value in fn(row).items():
                    new[name][i] = value
            except Reject as r:
                status[i], reason[i], message[i], where[i] = r.status, r.reason, r.message, stage
            except Exception as e:  # a bug or an unforeseen file must cost one sample, never the job
                status[i], reason[i], message[i], where[i] = "rejected", "stage_error", error_message(e), stage
            finally:
                if isinstance(row, StagedRow):
                    message[i] = row.in_terms_of_uris(str(message[i]))
                    row.close()
    finally:
        if chain is None:
            copies.close()
    out = dict(batch)
    out.update({"status": status, "reason": reason, "message": message, "stage": where})
    out.update(new)
    return {k: _column(v) for k, v in out.items()}


def _column(values) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values
    if any(v is None or isinstance(v, (bytes, str, list, dict, np.ndarray)) for v in values):
        arr = np.empty(len(values), dtype=object)
        for i, v in enumerate(values):  # element-wise: a list of equal-shape arrays must not broadcast
            arr[i] = v
        return arr
    return np.asarray(values)


def stage_resources(stage_cls: type[Stage], cfg: CurationConfig) -> StageResources:
    return cfg.resources.get(stage_cls.name, stage_cls.resources)


def limit_threads() -> None:
    """Hold torch and OpenCV, where the stages imported them, to `worker_threads()` (onnxruntime sessions
    take it when they are created)."""
    threads = worker_threads()
    if threads is None:
        return
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    if "cv2" in sys.modules:
        sys.modules["cv2"].setNumThreads(threads)


def quiet_model_loads() -> None:
    """In a Ray worker, no progress bars from Hugging Face libraries: transformers draws one for every model it
    loads, even in well under a second, and Ray forwards each actor's bar to the driver's console as garbled
    lines. Ray Data's own progress already shows an actor still starting. `HF_HUB_DISABLE_PROGRESS_BARS=0` in
    the worker's environment keeps them."""
    if worker_threads() is None or os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "0":
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when huggingface_hub is first imported
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


class StageChain:
    """Several stages run one after another in one process, batch by batch.

    Ray Data fuses a task map into the next map, but never two actor maps (its operator fusion refuses
    actor -> actor), so without this every stage that loads a model is an actor pool of its own: a process per
    actor that starts Python, imports torch and loads its model before its first batch, and a hop through the
    object store between every two stages. On a small machine those fixed costs outweigh the work. A chain
    loads each of its stages once per actor and hands batches from stage to stage in memory.
    """

    stages: ClassVar[tuple[type[Stage], ...]] = ()
    name: ClassVar[str] = ""

    def __init__(self, cfg: CurationConfig, then: tuple[Callable, dict] | None = None):
        quiet_model_loads()
        self.parts = [stage_cls(cfg) for stage_cls in self.stages]
        self.sizes = [stage_resources(stage_cls, cfg).batch_size for stage_cls in self.stages]
        self.keep_bytes = cfg.fusion.keep_inputs_mb << 20
        self.then = then
        limit_threads()

    def __call__(self, batch: Batch) -> Batch:
        spent = {}
        with chain_copies(self.keep_bytes):  # remote inputs fetched once for all the chain's stages
            for part, size in zip(self.parts, self.sizes):
                cpu, wall = time.process_time(), time.perf_counter()
                batch = in_slices(part, batch, size)
                spent[part.name] = (time.process_time() - cpu, time.perf_counter() - wall)
        batch = with_timing(batch, spent)
        return batch if self.then is None else self.then[0](batch, **self.then[1])


# Per row, JSON {stage: [cpu_s, wall_s]}: the row's share of each batch's time in each stage it went through
# (the batch's time over its rows out). The job sums it over all rows (the time each stage took, across every
# worker) and drops it before the shards are written. Ray Data's own stats stop at the map, and a map here
# runs a whole chain of stages; this column follows the rows through every map and every node.
TIMING_COLUMN = "stage_seconds"


def with_timing(batch: Batch, spent: dict[str, tuple[float, float]]) -> Batch:
    """`batch` with each row's share of `spent` (stage -> (process CPU s, wall s)) added to its TIMING_COLUMN."""
    n = num_rows(batch)
    if n == 0:
        return batch
    share = {name: (cpu / n, wall / n) for name, (cpu, wall) in spent.items()}
    before = batch.get(TIMING_COLUMN)
    column = np.empty(n, dtype=object)
    for i in range(n):
        times = json.loads(before[i]) if before is not None and before[i] else {}
        for name, (cpu, wall) in share.items():
            old = times.get(name, (0.0, 0.0))
            times[name] = [old[0] + cpu, old[1] + wall]
        column[i] = json.dumps(times)
    return {**batch, TIMING_COLUMN: column}


def add_timing(totals: dict[str, list[float]], row: dict) -> None:
    """Add a row's TIMING_COLUMN (removed from the row) into `totals` (stage -> [cpu_s, wall_s])."""
    value = row.pop(TIMING_COLUMN, None)
    for name, (cpu, wall) in (json.loads(value) if value else {}).items():
        total = totals.setdefault(name, [0.0, 0.0])
        total[0] += cpu
        total[1] += wall


def in_slices(stage: Callable[[Batch], Batch], batch: Batch, size: int) -> Batch:
    """`stage` over `batch` in slices of at most `size` rows (its declared batch size), joined again."""
    n = num_rows(batch)
    if n <= size:
        return stage(batch)
    outs = [stage({k: v[i:i + size] for k, v in batch.items()}) for i in range(0, n, size)]
    return {k: _joined([out[k] for out in outs]) for k in outs[0]}


def _joined(parts: list) -> np.ndarray:
    """Slices of one column end to end: typed arrays of one dtype and row shape stay typed."""
    typed = all(isinstance(p, np.ndarray) and p.dtype != object for p in parts)
    if typed and len({(p.dtype, p.shape[1:]) for p in parts}) == 1:
        return np.concatenate(parts)
    return _column([x for part in parts for x in part])


@dataclasses.dataclass(frozen=True)
class Segment:
    """Consecutive stages that run as one Ray Data map (one stage alone, or a StageChain)."""

    stages: tuple[type[Stage], ...]
    resources: StageResources

    @property
    def name(self) -> str:
        return "+".join(s.name for s in self.stages)

    @property
    def holds_state(self) -> bool:
        return any(holds_state(s) for s in self.stages)

    def callable(self) -> type:
        """The StageChain class Ray Data constructs per actor (or per task batch), named after its stages so
        the plan and progress bars say what runs."""
        title = "+".join(s.__name__ for s in self.stages)
        return type(title, (StageChain,), {"stages": self.stages, "name": self.name, "__qualname__": title})


# Rows per task of a fused map without actors (each member still runs on slices of its own batch size, see
# StageChain). Every task pays a fixed cost (its arguments, the chain, Arrow <-> numpy, the executor's round
# trip) and the scan's stages are cheap per row: on 2 cores the scan of 5,776 inputs took 23.6-26.2 s at 32
# rows per task, 19.4-20.3 s at 128 (64: 23.2 s, 256: 19.9 s; 976 inputs: no difference). Ray Data's own
# default batch is 1024 rows.
TASK_BATCH_ROWS = 128


def segments(stages: tuple[type[Stage], ...], cfg: CurationConfig, cluster_cpus: float | None = None,
             reserve: float = 0.5, rows: int | None = None) -> list[Segment]:
    """The stages as Ray Data maps. With `cfg.fusion.enabled`, consecutive stages asking for the same GPUs
    (the CPU-only ones together; a GPU captioner apart from the CPU work around it, so the GPU never waits on
    decoding) become one chain asking for the most CPUs / GPUs and the largest batch of its members (each member
    still sees batches of its own size: see StageChain). Given `rows` and `cluster_cpus`, a fused map without
    actors (Ray tasks) takes batches of up to TASK_BATCH_ROWS rows, as long as that leaves 4 tasks per CPU.

    With fusion, each CPU-only map with actors gets `cfg.fusion.pool` actors, or its share of what
    `cluster_cpus` hold beside the GPU pools and `reserve` (at least its declared pool). GPU maps keep their
    largest member pool. Without fusion every stage keeps its declared resources. With `rows` (how many rows
    will come), no pool is larger than the number of batches: a small job would start actors that get no work."""
    groups: list[list[type[Stage]]] = []
    for stage_cls in stages:
        gpus = stage_resources(stage_cls, cfg).num_gpus
        if cfg.fusion.enabled and groups and stage_resources(groups[-1][-1], cfg).num_gpus == gpus:
            groups[-1].append(stage_cls)
        else:
            groups.append([stage_cls])
    out = []
    for group in groups:
        res = [stage_resources(s, cfg) for s in group]
        seg = Segment(tuple(group), res[0] if len(group) == 1 else StageResources(
            num_cpus=max(r.num_cpus for r in res), num_gpus=res[0].num_gpus,
            batch_size=max(r.batch_size for r in res), pool=max(r.pool for r in res)))
        if cfg.fusion.enabled and not seg.holds_state and rows is not None and cluster_cpus:
            # at least 4 tasks per CPU, so the last tasks leave no CPU idle for long (clip splitting makes
            # scan rows heavy)
            target = min(TASK_BATCH_ROWS, int(rows // (4 * cluster_cpus)))
            seg = _with(seg, batch_size=max(seg.resources.batch_size, target))
        out.append(seg)
    filling = [i for i, p in enumerate(out) if p.holds_state and not p.resources.num_gpus]
    if cfg.fusion.enabled and (cluster_cpus is not None or cfg.fusion.pool is not None):
        others = sum(p.resources.num_cpus * p.resources.pool for i, p in enumerate(out)
                     if p.holds_state and i not in filling)
        for i in filling:
            res = out[i].resources
            fill = int(max(0.0, (cluster_cpus or 0.0) - reserve - others) / len(filling) // res.num_cpus)
            out[i] = _with(out[i], pool=cfg.fusion.pool or max(res.pool, fill))
    if rows is not None:
        out = [_with(p, pool=max(1, min(p.resources.pool, -(-rows // p.resources.batch_size)))) for p in out]
    return out


def _with(segment: Segment, **resources) -> Segment:
    return dataclasses.replace(segment, resources=segment.resources.model_copy(update=resources))


def cpu_scale(parts: list[Segment], available: float, reserve: float = 0.5) -> float:
    """1.0 when the segments' actor pools fit in `available` CPUs, else the factor that makes them fit.

    Every actor pool of a streaming pipeline lives at once; pools that ask for more CPUs than the cluster has
    leave a stage's actors pending forever (a deadlock, not a slowdown). `reserve` keeps room for tasks.
    """
    demand = sum(p.resources.num_cpus * p.resources.pool for p in parts if p.holds_state)
    return min(1.0, max(available - reserve, 0.1) / demand) if demand else 1.0


def holds_state(stage_cls: type[Stage]) -> bool:
    """Whether the stage loads something in `__init__` (a model, a detector) worth keeping alive in an actor."""
    return stage_cls.__init__ is not Stage.__init__


def stateless_task(segment: Segment) -> Callable[[Batch, CurationConfig], Batch]:
    """A function running one batch through stages that hold no state (constructing them costs nothing),
    named after them so Ray Data's plan and progress bars show which stages run."""
    chain = segment.callable()

    def run(batch: Batch, cfg: CurationConfig, then: tuple[Callable, dict] | None = None) -> Batch:
        return chain(cfg, then)(batch)

    run.__name__ = run.__qualname__ = chain.__name__
    return run


def apply_segment(ds, segment: Segment, cfg: CurationConfig, cpu_factor: float = 1.0,
                  remote_args: dict | None = None, prelude: tuple[Callable, dict] | None = None,
                  postlude: tuple[Callable, dict] | None = None, whole_blocks: bool = False):
    """Map a Segment onto a Ray Dataset: its resources become `map_batches` keywords one-to-one (CPUs times
    `cpu_factor`, which is below 1 only when the whole pipeline would not fit the cluster).
    `remote_args`: extra Ray keywords, e.g. the storage runtime_env when inputs are at a URI.

    Stages with state run in an actor pool of `pool` actors. Stages without (each keeps `Stage.__init__`) run
    as Ray tasks: every actor is a process of its own that starts and imports its libraries before the first
    batch (seconds each on a small machine), while tasks share pooled worker processes, and Ray Data fuses
    a task map into the next map when their resources match (task -> task, task -> actor; never actor ->
    actor), so such a stage also skips a hop through the object store. `pool` does not apply to it.

    `prelude`: (function, keyword arguments) mapped over each batch just before the segment, with the same
    resources, so Ray Data fuses it into the segment's tasks or actors instead of starting workers of its own.
    `postlude`: (function, keyword arguments) called on each batch the segment's chain returns, in the same
    call (a task map after an actor map would not be fused into it: Ray Data fuses task -> actor, not back).
    `whole_blocks`: each call gets one whole block (`batch_size=None`) instead of batches cut from the blocks;
    the chain still hands each stage slices of its own batch size.
    """
    from ray.data import ActorPoolStrategy

    res = segment.resources
    keywords = dict(num_cpus=res.num_cpus * cpu_factor, num_gpus=res.num_gpus or None,
                    batch_size=None if whole_blocks else res.batch_size, batch_format="numpy", **(remote_args or {}))
    if prelude is not None:
        ds = ds.map_batches(prelude[0], fn_kwargs=prelude[1], **keywords)
    if not segment.holds_state:
        return ds.map_batches(stateless_task(segment), fn_kwargs={"cfg": cfg, "then": postlude}, **keywords)
    return ds.map_batches(segment.callable(), fn_constructor_args=(cfg, postlude),
                          compute=ActorPoolStrategy(size=res.pool), **keywords)


def apply_stage(ds, stage_cls: type[Stage], cfg: CurationConfig, cpu_factor: float = 1.0,
                remote_args: dict | None = None):
    """One stage alone as a Ray Data map (see apply_segment)."""
    return apply_segment(ds, Segment((stage_cls,), stage_resources(stage_cls, cfg)), cfg, cpu_factor, remote_args)
