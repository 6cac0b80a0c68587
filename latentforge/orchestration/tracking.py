"""The one place that talks to MLflow. Uses MlflowClient with explicit run ids: no global active run."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from latentforge.orchestration.delivery import (
    DeliveryQueue,
    artifact_record,
    is_permanent,
    log,
    metric_records,
    replay_spool,
    short_http_retries,
)

PARAM_MAX = 6000  # MLflow's limit on a param value


def default_tracking_uri(workdir: Path) -> str:
    return f"sqlite:///{(workdir / 'mlflow.db').resolve()}"


def resolve_tracking_uri(uri: str | None, workdir: Path, base: Path | None = None) -> str:
    """`uri`, else MLFLOW_TRACKING_URI, else the workdir's SQLite store; a relative store made absolute against
    `base` (the current directory), so Ray workers, which run in directories of their own, use the same one."""
    return absolute_tracking_uri(uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(workdir), base)


_SQLITE = re.compile(r"^(sqlite(?:\+\w+)?:///)([^?]*)(\?.*)?$")  # sqlite:///relative.db, sqlite:////abs.db
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def absolute_tracking_uri(uri: str, base: Path | None = None) -> str:
    """A tracking URI naming a local store by a relative path (`sqlite:///mlflow.db`, `file:./mlruns`, `mlruns`)
    made absolute against `base` (default: the current directory); any other URI (a server, a database, an
    absolute path) as it is."""
    base = Path.cwd() if base is None else base
    sqlite = _SQLITE.match(uri)
    if sqlite:
        prefix, path, query = sqlite.group(1), sqlite.group(2), sqlite.group(3) or ""
        if not path or path.startswith("/") or path == ":memory:" or path.startswith("file:"):
            return uri
        return f"{prefix}{(base / path).resolve()}{query}"
    if uri.startswith("file:"):
        path = uri[len("file:"):]
        return uri if path.startswith("/") else (base / unquote(path)).resolve().as_uri()  # not file:///, file://host
    if uri == "databricks" or _SCHEME.match(uri) or Path(uri).is_absolute():
        return uri
    return str((base / uri).resolve())  # a plain path: MLflow's file store


def artifact_root(workdir: Path) -> str:
    return (workdir / "mlartifacts").resolve().as_uri()


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"} for MLflow params."""
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(data, list) and any(isinstance(x, dict) for x in data):
        out = {}
        for i, v in enumerate(data):
            out.update(flatten(v, f"{prefix}.{i}"))
        return out
    return {prefix: str(data)[:PARAM_MAX]}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


class Tracker:
    """Creates (or reopens) runs and logs to them; driver-side. Workers get a `RunSink` for one run instead.

    Everything after run creation goes through a `DeliveryQueue`: an MLflow outage delays it, never stops the
    run. `run_tags` (config hash, git commit, workdir) go on every run this tracker creates or reopens.
    """

    def __init__(self, tracking_uri: str, experiment: str, artifact_location: str | None = None,
                 spool_dir: Path | None = None, run_tags: dict[str, str] | None = None, wait_s: float = 600.0):
        """`wait_s`: how long to wait for a tracking server that is away at start (see `resume_or_start`)."""
        from mlflow.tracking import MlflowClient

        short_http_retries()
        tracking_uri = absolute_tracking_uri(tracking_uri)  # RunSinks carry it to workers in other directories
        self.uri = tracking_uri
        self.spool_dir = spool_dir
        self.client = MlflowClient(tracking_uri)
        commit = git_commit()
        self.run_tags = {**({"mlflow.source.git.commit": commit} if commit else {}), **(run_tags or {})}
        self.experiment_id = self._retry(f"experiment {experiment}", lambda: self._experiment(
            experiment, artifact_location if tracking_uri.startswith("sqlite") else None), wait_s)
        spool = spool_dir / f"driver-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl" if spool_dir else None
        self.queue = DeliveryQueue(tracking_uri, spool)
        self.reopened: set[str] = set()  # runs of an earlier invocation that this one resumed

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found:
            return found.experiment_id
        try:
            # The UI then opens on runs, metrics and artifacts ("Model training"), not on GenAI traces.
            return self.client.create_experiment(name, artifact_location=artifact_location,
                                                 tags={"mlflow.experimentKind": "custom_model_development"})
        except MlflowException as e:  # created meanwhile (another process, or a retry whose reply was lost)
            if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
                raise
            return self.client.get_experiment_by_name(name).experiment_id

    def _retry(self, what: str, call, wait_s: float):
        """`call()`, retried for up to `wait_s` with one warning while the server is unreachable; a refusal
        (bad value, unknown run) is raised at once."""

        deadline, delay, warned = time.time() + wait_s, 2.0, False
        while True:
            try:
                return call()
            except Exception as e:
                if is_permanent(e) or time.time() + delay > deadline:
                    raise
                if not warned:
                    log.warning("cannot open MLflow %s: %s unreachable (%s); retrying for up to %.0fs", what,
                                self.uri, str(e).splitlines()[0][:200], wait_s)
                    warned = True
                time.sleep(delay)
                delay = min(30.0, delay * 2)

    def find_run(self, name: str, parent_id: str | None = None, tags: dict[str, str] | None = None,
                 top_level: bool = False) -> str | None:
        """The newest run of this name (under `parent_id`, or with no parent at all if `top_level`, with these
        tags), to resume instead of duplicating.

        Every condition is checked here on the runs the search returns: a value goes into the filter string
        only when it can be quoted there as it is (MLflow's filter grammar has no escapes), so a quote in a
        name or a workdir narrows the search less, never breaks it."""
        wanted = {"mlflow.runName": name, **({"mlflow.parentRunId": parent_id} if parent_id else {}), **(tags or {})}
        query = " and ".join(f"tags.`{key}` = {literal}" for key, value in wanted.items()
                             if (literal := filter_literal(value)) is not None and "`" not in key)
        token = None
        while True:
            page = self.client.search_runs([self.experiment_id], query, max_results=200,
                                           order_by=["start_time DESC"], page_token=token)
            for run in page:
                if all(run.data.tags.get(k) == str(v) for k, v in wanted.items()) and not (
                        top_level and run.data.tags.get("mlflow.parentRunId")):
                    return run.info.run_id
            token = page.token
            if not token:
                return None

    def start_run(self, name: str, parent_id: str | None = None, tags: dict[str, str] | None = None) -> str:
        all_tags = {"mlflow.runName": name, **self.run_tags, **(tags or {})}
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        return run.info.run_id

    def resume_or_start(self, name: str, parent_id: str | None = None, tags: dict[str, str] | None = None,
                        match: dict[str, str] | None = None, wait_s: float = 600.0,
                        top_level: bool = False) -> tuple[str, bool]:
        """Reopen the run of this name (and parent, or none if `top_level`, and `match` tags) if one exists,
        else create it.

        This needs the server (a run id cannot be queued): while it is away, retry for up to `wait_s` with a
        warning. Retrying the whole lookup means a run whose creation reply was lost is found, not duplicated."""
        return self._retry(f"run {name}", lambda: self._resume_or_start(name, parent_id, tags, match, top_level),
                           wait_s)

    def _resume_or_start(self, name: str, parent_id: str | None, tags: dict[str, str] | None,
                         match: dict[str, str] | None, top_level: bool) -> tuple[str, bool]:
        found = self.find_run(name, parent_id, match, top_level)
        if found is None:
            return self.start_run(name, parent_id, {**(match or {}), **(tags or {})}), False
        self.client.update_run(found, status="RUNNING")
        self.set_tags(found, {**self.run_tags, **(tags or {})})
        self.reopened.add(found)
        return found, True

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.queue.put(*({"kind": "tag", "run_id": run_id, "key": k, "value": str(v)[:PARAM_MAX]}
                         for k, v in tags.items()))

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Params, flattened to dotted keys. On a reopened run, a value that differs from the one its first
        invocation logged (a resume with other resources, say) cannot be logged again: MLflow params are
        immutable, and the refusal used to be the only trace. Such values go to tags `latentforge.param_now.KEY`
        and to an artifact `invocations/<UTC time>.json` with both values; unchanged ones are not sent again."""
        flat = flatten(params)
        if run_id in self.reopened:
            flat = self._record_changed_params(run_id, flat)
        self.queue.put(*({"kind": "param", "run_id": run_id, "key": k, "value": v} for k, v in flat.items()))

    def _record_changed_params(self, run_id: str, flat: dict[str, str]) -> dict[str, str]:
        """The params still to log; changed ones recorded as tags and an artifact. With the server away,
        everything is queued as before (what MLflow then refuses is dropped with a warning)."""
        try:
            logged = self.client.get_run(run_id).data.params
        except Exception as e:
            log.warning("cannot compare params with those of run %s (%s); logging them as they are", run_id,
                        str(e).splitlines()[0][:200])
            return flat
        changed = {k: {"first": logged[k], "now": v} for k, v in flat.items() if k in logged and logged[k] != v}
        if changed:
            log.warning("resumed run %s: %d param(s) differ from its first invocation's (%s); MLflow keeps the "
                        "first values, the new ones are in tags latentforge.param_now.* and artifact invocations/",
                        run_id, len(changed), ", ".join(sorted(changed)[:5]) + (" ..." if len(changed) > 5 else ""))
            self.set_tags(run_id, {f"latentforge.param_now.{k}": c["now"] for k, c in changed.items()})
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            self.log_dict(run_id, {"changed_params": changed}, f"{stamp}.json", "invocations")
        return {k: v for k, v in flat.items() if k not in logged}

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        self.queue.put(*metric_records(run_id, metrics, step))

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        if self.queue.healthy and not self.queue.pending():
            try:
                self.client.log_artifact(run_id, str(path), artifact_path)
                return
            except Exception:  # queued below, like every other record during an outage
                pass
        self.queue.put(artifact_record(run_id, path, artifact_path, self.spool_dir))

    def log_dict(self, run_id: str, data: dict, name: str, artifact_path: str | None = None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
            self.log_artifact(run_id, path, artifact_path)

    def log_dataset(self, run_id: str, dataset_dir: Path, context: str, name: str | None = None) -> None:
        """A curated dataset as an MLflow run input: source = its manifest, digest = its content-derived id."""
        self.queue.put(dataset_record(run_id, dataset_dir, context, name))

    def register_model(self, name: str, run_id: str, artifact_path: str, tags: dict[str, str]) -> str:
        """A new version of registered model `name` pointing at the run's artifact directory; returns it."""
        from mlflow.exceptions import MlflowException

        self.flush()  # the version points at artifacts that must be there first
        try:
            self.client.create_registered_model(name, description="latentforge DiT: safetensors + model config")
        except MlflowException as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
                raise
        version = self.client.create_model_version(name, f"runs:/{run_id}/{artifact_path}", run_id=run_id,
                                                   tags=tags)
        return version.version

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:

        self.queue.put({"kind": "terminate", "run_id": run_id, "status": status, "end_time": int(time.time() * 1000)})

    def flush(self, timeout_s: float = 0.0) -> bool:
        """Deliver what is queued now (waiting up to `timeout_s` for a server that is away)."""

        deadline = time.time() + timeout_s
        while not self.queue.deliver_once():
            if time.time() >= deadline:
                return False
            time.sleep(1.0)
        return True

    def close(self, timeout_s: float = 30.0) -> bool:
        return self.queue.close(timeout_s)

    def replay(self, run_id: str | None = None) -> int:
        """Deliver spool files that earlier (or crashed) processes left in the spool directory."""
        if self.spool_dir is None:
            return 0
        return replay_spool(self.uri, self.spool_dir, skip=self.queue.spool_file, run_id=run_id)

    def sink(self, run_id: str, system_metrics_s: float | None = None) -> RunSink:
        return RunSink(self.uri, run_id, str(self.spool_dir) if self.spool_dir else None, system_metrics_s)


def filter_literal(value: str) -> str | None:
    """`value` quoted for an MLflow search filter, or None where it cannot be written there as it is (it holds
    both kinds of quote, or a backslash, which the filter parser does not unescape)."""
    value = str(value)
    if "\\" in value:
        return None
    for quote in ("'", '"'):
        if quote not in value:
            return f"{quote}{value}{quote}"
    return None


def dataset_digest(dataset_id: str) -> str:
    """The MLflow digest (at most 36 characters) of a dataset id: the id itself when it fits, else a hash of all
    of it. Ids are `NAME-HASH`: cut to 36 characters, a long NAME would leave every version the same digest."""
    return dataset_id if len(dataset_id) <= 36 else hashlib.sha256(dataset_id.encode()).hexdigest()[:36]


def dataset_record(run_id: str, dataset_dir: Path, context: str, name: str | None = None) -> dict:
    """The mlflow.data form of a dataset (a MetaDataset: the manifest is referenced, not copied)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    from latentforge.datasets import storage

    card = json.loads(storage.read_text(storage.join(dataset_dir, "card.json")))
    manifest = storage.join(dataset_dir, "manifest.parquet")  # a URI stays one (mlflow has s3/gs sources)
    with warnings.catch_warnings():
        # MLflow 3.x registers its local-file source class twice, so every local path "can be interpreted in
        # multiple ways" (a UserWarning per logged dataset): both candidates are the same class.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        source = resolve_dataset_source(manifest if storage.is_remote(manifest) else str(Path(manifest).resolve()))
    entity = MetaDataset(source, name=name or card["name"], digest=dataset_digest(str(card["id"])))._to_mlflow_entity()
    return {"kind": "input", "run_id": run_id, "name": entity.name, "digest": entity.digest,
            "source_type": entity.source_type, "source": entity.source, "schema": entity.schema,
            "profile": json.dumps({"num_samples": card.get("num_samples"), "dataset_id": card["id"]}),
            "context": context}


@dataclass
class RunSink:
    """A picklable handle to one run, handed to Ray Train workers (rank 0 logs through it).

    Logging is queued (see `DeliveryQueue`); undelivered records are spooled under `spool_dir` (shared storage,
    like checkpoints) so the driver can deliver what a dead worker left. With `system_metrics_s`, `start()`
    samples CPU / memory / disk / network / GPU every so many seconds as `system/...` metrics.
    """

    uri: str
    run_id: str
    spool_dir: str | None = None
    system_metrics_s: float | None = None
    _queue: Any = field(default=None, repr=False, compare=False)
    _monitor: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Made where the sink is made (the driver): a worker unpickles it in a directory of its own.
        self.uri = absolute_tracking_uri(self.uri)

    def __getstate__(self) -> dict:
        return {"uri": self.uri, "run_id": self.run_id, "spool_dir": self.spool_dir,
                "system_metrics_s": self.system_metrics_s, "_queue": None, "_monitor": None}

    @property
    def queue(self) -> DeliveryQueue:
        if self._queue is None:
            spool = Path(self.spool_dir) / f"{self.run_id}-{os.getpid()}.jsonl" if self.spool_dir else None
            self._queue = DeliveryQueue(self.uri, spool)
        return self._queue

    @property
    def client(self):
        return self.queue.client

    def start(self) -> None:
        if self.system_metrics_s and self._monitor is None:
            from latentforge.orchestration.system_metrics import SystemMetricsSampler

            self._monitor = SystemMetricsSampler(self.uri, self.run_id, self.system_metrics_s, self.log_metrics)
            self._monitor.start()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.queue.put(*metric_records(self.run_id, metrics, step))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.queue.put(artifact_record(self.run_id, path, artifact_path,
                                       Path(self.spool_dir) if self.spool_dir else None))

    def close(self, timeout_s: float = 30.0) -> bool:
        if self._monitor is not None:
            self._monitor.stop()
            self._monitor = None
        return self.queue.close(timeout_s) if self._queue is not None else True
