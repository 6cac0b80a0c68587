"""The Stage shape: a plain callable over columnar batches that declares its Ray Data resources."""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np

from latentforge.datasets import storage
from latentforge.pipelines.resources import StageResources

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


def rows_of(batch: Batch) -> list[dict]:
    n = len(next(iter(batch.values()))) if batch else 0
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


# Columns naming an input file. Decoders (PIL, decord, PyAV, soundfile) need a local file, so for inputs at a
# URI (s3://...) these are staged per row; see StagedRow.
PATH_COLUMNS = ("uri", "caption_path")


class StagedRow(dict):
    """A row whose remote input columns read as local scratch copies, fetched on first read: a stage that
    never opens the file (a threshold filter, the text encoder) downloads nothing. `close()` deletes them.

    Copies of the row (`{**row}`, `dict(row)`) keep the URIs: only reading a column gives the local path.
    Staged per row, not cached per node: a later stage may run on another node, and a per-row copy keeps the
    disk a worker needs at one batch of inputs whatever the corpus size (the price: each stage that decodes
    the file fetches it again)."""

    def __init__(self, row: dict):
        super().__init__(row)
        self._copies = contextlib.ExitStack()
        self._local: dict[str, str] = {}

    def __getitem__(self, key):
        value = super().__getitem__(key)
        if key not in PATH_COLUMNS or not storage.is_remote(str(value)):
            return value
        if key not in self._local:
            self._local[key] = str(self._copies.enter_context(storage.local_copy(str(value))))
        return self._local[key]

    def get(self, key, default=None):
        return self[key] if key in self else default

    def in_terms_of_uris(self, message: str) -> str:
        """A decoder's message with each scratch path replaced by the URI it stands for."""
        for key, local in self._local.items():
            message = message.replace(local, str(dict.__getitem__(self, key)))
        return message

    def close(self) -> None:
        self._copies.close()


def _staged(row: dict) -> dict:
    remote = any(storage.is_remote(str(dict.get(row, c))) for c in PATH_COLUMNS if c in row)
    return StagedRow(row) if remote else row


@contextlib.contextmanager
def staged(row: dict):
    """For stages that read inputs outside `map_ok_rows`: `with staged(row) as r: decode(r["uri"])`."""
    row = _staged(row)
    try:
        yield row
    finally:
        if isinstance(row, StagedRow):
            row.close()


def map_ok_rows(batch: Batch, fn: Callable[[dict], dict], outputs: dict[str, Any], stage: str) -> Batch:
    """Apply `fn` to each row still `ok`; a `Reject` marks that row and the rest go on."""
    rows = [_staged(r) for r in rows_of(batch)]
    new = {name: [default] * len(rows) for name, default in outputs.items()}
    status, reason, message, where = (list(batch[c]) for c in ("status", "reason", "message", "stage"))
    for i, row in enumerate(rows):
        if row["status"] != "ok":
            continue
        try:
            for name, value in fn(row).items():
                new[name][i] = value
        except Reject as r:
            status[i], reason[i], message[i], where[i] = r.status, r.reason, r.message, stage
        except Exception as e:  # a bug or an unforeseen file must cost one sample, never the job
            status[i], reason[i], message[i], where[i] = "rejected", "stage_error", f"{type(e).__name__}: {e}", stage
        finally:
            if isinstance(row, StagedRow):
                message[i] = row.in_terms_of_uris(str(message[i]))
                row.close()
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


def cpu_scale(stages: tuple[type[Stage], ...], cfg: CurationConfig, available: float, reserve: float = 0.5) -> float:
    """1.0 when the stages' actor pools fit in `available` CPUs, else the factor that makes them fit.

    Every actor pool of a streaming pipeline lives at once; pools that ask for more CPUs than the cluster has
    leave a stage's actors pending forever (a deadlock, not a slowdown). `reserve` keeps room for tasks.
    """
    demand = sum(stage_resources(s, cfg).num_cpus * stage_resources(s, cfg).pool for s in stages)
    return min(1.0, max(available - reserve, 0.1) / demand) if demand else 1.0


def holds_state(stage_cls: type[Stage]) -> bool:
    """Whether the stage loads something in `__init__` (a model, a detector) worth keeping alive in an actor."""
    return stage_cls.__init__ is not Stage.__init__


def stateless_task(stage_cls: type[Stage]) -> Callable[[Batch, CurationConfig], Batch]:
    """A function running one batch through a stage that holds no state (constructing it costs nothing),
    named after the stage so Ray Data's plan and progress bars show which stage it is."""
    def run(batch: Batch, cfg: CurationConfig) -> Batch:
        return stage_cls(cfg)(batch)

    run.__name__ = run.__qualname__ = stage_cls.__name__
    return run


def apply_stage(ds, stage_cls: type[Stage], cfg: CurationConfig, cpu_factor: float = 1.0,
                remote_args: dict | None = None):
    """Map a Stage onto a Ray Dataset: declared resources become `map_batches` keywords one-to-one
    (CPUs times `cpu_factor`, which is below 1 only when the whole pipeline would not fit the cluster).
    `remote_args`: extra Ray keywords, e.g. the storage runtime_env when inputs are at a URI.

    A stage with state runs in an actor pool of `pool` actors. One without (it keeps `Stage.__init__`) runs
    as Ray tasks: every actor is a process of its own that starts and imports its libraries before the first
    batch (seconds each on a small machine), while tasks share pooled worker processes, and Ray Data fuses
    a task map into the next map when their resources match (task -> task, task -> actor; never actor ->
    actor), so such a stage also skips a hop through the object store. `pool` does not apply to it.
    """
    from ray.data import ActorPoolStrategy

    res = stage_resources(stage_cls, cfg)
    keywords = dict(num_cpus=res.num_cpus * cpu_factor, num_gpus=res.num_gpus or None, batch_size=res.batch_size,
                    batch_format="numpy", **(remote_args or {}))
    if not holds_state(stage_cls):
        return ds.map_batches(stateless_task(stage_cls), fn_kwargs={"cfg": cfg}, **keywords)
    return ds.map_batches(stage_cls, fn_constructor_args=(cfg,), compute=ActorPoolStrategy(size=res.pool),
                          **keywords)
