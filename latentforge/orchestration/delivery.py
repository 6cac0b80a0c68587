"""Tracking that survives an MLflow outage: records queue in memory, a background thread delivers them, and
whatever is undelivered while the server is away is mirrored to a JSON-lines spool file beside the run.

MlflowClient alone retries each request with exponential backoff (MLFLOW_HTTP_REQUEST_MAX_RETRIES=7 by default:
minutes of stall) and then raises into the training loop. Here a request fails fast (see `short_http_retries`),
the record stays queued, and delivery is retried in a background thread with its own backoff; training waits
for at most one failed request per outage.
While the server answers, delivery is synchronous, so nothing is in flight when a worker dies; a spool file
left by a process that died during an outage is delivered by the next `replay_spool`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

log = logging.getLogger("latentforge.tracking")

MAX_RECORDS = 100_000  # in memory and in a spool file; beyond it the oldest metric points are dropped (with a warning)
BATCH_METRICS, BATCH_PARAMS, BATCH_TAGS = 1000, 100, 100  # MLflow's log_batch limits
PERMANENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST",
             "PERMISSION_DENIED", "UNAUTHENTICATED"}
BATCHED = ("metric", "param", "tag")


def short_http_retries() -> None:
    """Fail an MLflow request in seconds, not minutes; an explicit setting in the environment wins.

    The environment is the only knob MlflowClient has (read per request), so this is process-wide.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


class LocalRecordError(Exception):
    """A record this machine cannot send (its artifact file is gone or unreadable): no retry can fix it."""


def is_permanent(error: Exception) -> bool:
    """A refusal (bad value, unknown run) or a local failure of one record that retrying cannot fix, as opposed
    to an unreachable server."""
    return isinstance(error, LocalRecordError) or str(getattr(error, "error_code", "")) in PERMANENT


def describe(records: list[dict]) -> str:
    """'loss steps 3-40 (38 points), param lr, ...': what a list of records holds, for warnings."""
    steps: dict[str, list[int]] = {}
    other: list[str] = []
    for r in records:
        if r["kind"] == "metric":
            steps.setdefault(f"{r['run_id'][:8]}/{r['key']}", []).append(r["step"])
        else:
            other.append(f"{r['kind']} {r.get('key') or r.get('artifact_path') or r.get('status') or ''}".strip())
    parts = [f"{k} steps {min(v)}-{max(v)} ({len(v)} points)" for k, v in sorted(steps.items())]
    return ", ".join(parts + sorted(set(other))) or "nothing"


class DeliveryQueue:
    """Ordered, bounded, spooled delivery of metrics, params, tags, dataset inputs, artifacts and run ends."""

    def __init__(self, uri: str, spool_file: Path | None = None, max_records: int = MAX_RECORDS,
                 max_backoff_s: float = 15.0):
        self.uri, self.spool_file, self.max_records, self.max_backoff_s = uri, spool_file, max_records, max_backoff_s
        self._pending: list[dict] = []
        self._spooled = 0  # how many of _pending (a prefix) the spool file holds
        self._lock = threading.RLock()
        self._delivering = threading.Lock()  # one delivery at a time: the thread and close() must not both send
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.down_since: float | None = None
        self._backoff = 1.0
        self.dropped: list[dict] = []
        self.delivered = 0  # records MLflow accepted (not those it refused or that could not be sent)
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            short_http_retries()
            self._client = MlflowClient(self.uri)
        return self._client

    @property
    def healthy(self) -> bool:
        return self.down_since is None

    def put(self, *records: dict) -> None:
        """Queue records. While the server answers they are delivered before this returns (as MlflowClient
        would); while it does not, they are spooled and a background thread retries with backoff."""
        with self._lock:
            self._pending.extend(records)
            self._bound()
            if not self.healthy:  # the server is away: a crash now must not lose these
                self._append_spool()
        if self.healthy:
            self.deliver_once()
        if not self.healthy:
            self._retry_in_background()

    def load_spool(self, records: list[dict]) -> None:
        """Queue records that `spool_file` already holds (a replay): each is taken out of the file once delivered
        (or refused), so a replay cut short resumes after what it delivered."""
        with self._lock:
            self._pending = list(records) + self._pending
            self._spooled = len(records)

    def _retry_in_background(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._closed = False  # a put after close() starts retrying again
            self._thread = threading.Thread(target=self._run, daemon=True, name="latentforge-tracking")
            self._thread.start()
        self._wake.set()

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def _bound(self) -> None:
        over = len(self._pending) - self.max_records
        if over <= 0:
            return
        gone = [r for r in self._pending if r["kind"] == "metric"][:over]
        self._remove({id(r) for r in gone})
        self.dropped.extend(gone)
        log.warning("MLflow unreachable and %d records queued (limit %d): dropped the oldest %d metric points: %s",
                    len(self._pending), self.max_records, len(gone), describe(gone))

    def _remove(self, ids: set[int]) -> None:
        """Take these records (by identity) out of the queue, and out of the spool file if it holds them."""
        in_spool = sum(1 for r in self._pending[:self._spooled] if id(r) in ids)
        self._pending = [r for r in self._pending if id(r) not in ids]
        if in_spool:
            self._spooled -= in_spool
            self._rewrite_spool()

    def _run(self) -> None:
        while not self._closed and not self.healthy:
            self._wake.wait(timeout=self._backoff)
            self._wake.clear()
            self.deliver_once()

    def deliver_once(self) -> bool:
        """Try to deliver everything queued; True when the queue is empty afterwards."""
        with self._delivering:
            return self._deliver_once()

    def _deliver_once(self) -> bool:
        with self._lock:
            batch = list(self._pending)
        if not batch:
            return True
        done = 0
        try:
            for group in groups(batch):
                self.delivered += self._deliver_group(group)
                done += len(group)
        except Exception as e:  # unreachable, timed out, 5xx: keep the records, retry later
            self._note_down(e)
        with self._lock:
            # by identity: records may have been dropped (queue limit) while this delivery was under way
            self._remove({id(r) for r in batch[:done]})
            if self._pending and not self.healthy:
                self._append_spool()
            if not self._pending and self.down_since is not None:
                log.warning("MLflow at %s is back after %.0fs; delivered every queued record", self.uri,
                            time.time() - self.down_since)
                self.down_since, self._backoff = None, 1.0
            return not self._pending

    def _note_down(self, error: Exception) -> None:
        if self.down_since is None:
            self.down_since = time.time()
            log.warning("MLflow at %s unreachable (%s); training goes on, records are queued%s", self.uri,
                        str(error).splitlines()[0][:200],
                        f" and spooled to {self.spool_file}" if self.spool_file else "")
        else:
            self._backoff = min(self.max_backoff_s, self._backoff * 2)

    def _deliver_group(self, group: list[dict]) -> int:
        """Deliver one group; a record refused for good is dropped with a warning. Returns how many arrived."""
        try:
            deliver(self.client, group)
            return len(group)
        except Exception as e:
            if not is_permanent(e):
                raise
        arrived = 0
        for record in group:  # find the offending record(s); deliver the rest
            try:
                deliver(self.client, [record])
                arrived += 1
            except Exception as one:
                if not is_permanent(one):
                    raise
                if isinstance(one, LocalRecordError):
                    log.warning("cannot send %s: %s (dropped)", describe([record]), str(one)[:300])
                else:
                    log.warning("MLflow refused %s: %s (dropped)", describe([record]), str(one)[:300])
        return arrived

    def _append_spool(self) -> None:
        if self.spool_file is None or self._spooled >= len(self._pending):
            return
        self.spool_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.spool_file, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in self._pending[self._spooled:])
        self._spooled = len(self._pending)

    def _rewrite_spool(self) -> None:
        if self.spool_file is None:
            return
        if not self._spooled:
            self.spool_file.unlink(missing_ok=True)
            return
        tmp = self.spool_file.with_suffix(".partial")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self._pending[:self._spooled]))
        tmp.replace(self.spool_file)

    def close(self, timeout_s: float = 30.0) -> bool:
        """Deliver what is queued within `timeout_s`; what is left stays in the spool file (named in a warning)."""
        deadline = time.time() + timeout_s
        while not self.deliver_once() and time.time() < deadline:
            time.sleep(min(1.0, max(0.0, deadline - time.time())))
        self._closed = True
        self._wake.set()
        with self._lock:
            if self._pending:
                self._append_spool()
                where = f"kept in {self.spool_file} (delivered by the next run on this workdir)" \
                    if self.spool_file else "DROPPED (no spool file)"
                log.warning("MLflow at %s still unreachable: %d records undelivered, %s: %s", self.uri,
                            len(self._pending), where, describe(self._pending))
            if self.dropped:
                log.warning("MLflow outage: %d metric points were dropped over the queue limit: %s",
                            len(self.dropped), describe(self.dropped))
            return not self._pending


def groups(records: list[dict]) -> list[list[dict]]:
    """Consecutive records of one run that fit one log_batch call; anything else alone."""
    out: list[list[dict]] = []
    for r in records:
        last = out[-1] if out else None
        if (last and r["kind"] in BATCHED and last[0]["kind"] in BATCHED and last[0]["run_id"] == r["run_id"]
                and fits(last + [r])):
            last.append(r)
        else:
            out.append([r])
    return out


def fits(group: list[dict]) -> bool:
    n = Counter(r["kind"] for r in group)
    return n["metric"] <= BATCH_METRICS and n["param"] <= BATCH_PARAMS and n["tag"] <= BATCH_TAGS \
        and len(group) <= BATCH_METRICS


def deliver(client, group: list[dict]) -> None:
    from mlflow.entities import Metric, Param, RunTag

    first = group[0]
    kind, run_id = first["kind"], first["run_id"]
    if kind in BATCHED:
        client.log_batch(
            run_id, metrics=[Metric(r["key"], r["value"], r["timestamp"], r["step"]) for r in group
                             if r["kind"] == "metric"],
            params=[Param(r["key"], r["value"]) for r in group if r["kind"] == "param"],
            tags=[RunTag(r["key"], r["value"]) for r in group if r["kind"] == "tag"])
    elif kind == "artifact":
        path = Path(first["path"])
        try:
            with open(path, "rb"):
                pass
        except OSError as e:  # a local problem of this record, not an outage
            hint = "; this copy is deleted once uploaded, so an earlier attempt may have sent it" \
                if first.get("owned") else ""
            raise LocalRecordError(f"its file {path} cannot be read ({e.strerror or e}{hint})") from e
        try:
            client.log_artifact(run_id, str(path), first.get("artifact_path"))
        except Exception as e:
            if not path.is_file():  # deleted while it was being sent
                raise LocalRecordError(f"its file {path} disappeared during the upload ({e})") from e
            raise
        if first.get("owned"):
            shutil.rmtree(Path(first["path"]).parent, ignore_errors=True)
    elif kind == "input":
        client.log_inputs(run_id, [dataset_input(first)])
    elif kind == "terminate":
        client.set_terminated(run_id, first["status"], end_time=first["end_time"])
    else:
        raise ValueError(f"unknown tracking record kind {kind!r}")


def dataset_input(record: dict):
    from mlflow.entities import Dataset, DatasetInput, InputTag

    ds = Dataset(name=record["name"], digest=record["digest"], source_type=record["source_type"],
                 source=record["source"], schema=record.get("schema"), profile=record.get("profile"))
    return DatasetInput(ds, [InputTag("mlflow.data.context", record["context"])])


def metric_records(run_id: str, metrics: dict[str, float], step: int) -> list[dict]:
    now = int(time.time() * 1000)
    return [{"kind": "metric", "run_id": run_id, "key": k, "value": float(v), "timestamp": now, "step": int(step)}
            for k, v in metrics.items()]


def artifact_record(run_id: str, path: Path, artifact_path: str | None, spool_dir: Path | None) -> dict:
    """A record for a copy of a file (delivery is later; the caller may delete the original): in the spool
    directory when there is one, so a replay finds it, else in a temporary directory."""
    import tempfile

    keep = spool_dir / "files" / uuid.uuid4().hex if spool_dir is not None else Path(tempfile.mkdtemp())
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, keep / Path(path).name)
    return {"kind": "artifact", "run_id": run_id, "path": str(keep / Path(path).name), "artifact_path": artifact_path,
            "owned": True}


def replay_spool(uri: str, spool_dir: Path, skip: Path | None = None, run_id: str | None = None,
                 timeout_s: float = 30.0) -> int:
    """Deliver spool files left by earlier processes (all, or one run's); returns records delivered.

    Each file is the queue's spool file while it is replayed: records leave it as they are delivered (or
    dropped: refused by MLflow, or an artifact whose file is gone), and whatever the server could not take
    within `timeout_s` per file stays in it for the next replay."""
    if not spool_dir.is_dir():
        return 0
    delivered = 0
    for path in sorted(spool_dir.glob(f"{run_id or ''}*.jsonl")):
        if skip is not None and path.resolve() == skip.resolve():
            continue
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:  # a line cut short by a crash
                log.warning("spool %s: skipped an unreadable line", path)
        queue = DeliveryQueue(uri, path)
        queue.load_spool(records)
        if queue.close(timeout_s=timeout_s):
            path.unlink(missing_ok=True)  # (already gone when it held records: the last delivery removed it)
        delivered += queue.delivered
    return delivered
