"""The one place that talks to MLflow. Uses MlflowClient with explicit run ids: no global active run."""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PARAM_MAX = 6000  # MLflow's limit on a param value


def default_tracking_uri(workdir: Path) -> str:
    return f"sqlite:///{(workdir / 'mlflow.db').resolve()}"


def resolve_tracking_uri(uri: str | None, workdir: Path) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(workdir)


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
    """Creates runs and logs to them; driver-side. Workers get a `RunSink` for one run instead."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_location: str | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=artifact_location if tracking_uri.startswith("sqlite") else None,
            # The UI then opens on runs, metrics and artifacts ("Model training"), not on GenAI traces.
            tags={"mlflow.experimentKind": "custom_model_development"})

    def find_run(self, name: str, parent_id: str | None = None) -> str | None:
        """A run of this name (under `parent_id`), to resume instead of duplicating."""
        query = f"tags.mlflow.runName = '{name}'"
        if parent_id:
            query += f" and tags.mlflow.parentRunId = '{parent_id}'"
        runs = self.client.search_runs([self.experiment_id], query, max_results=1, order_by=["start_time DESC"])
        return runs[0].info.run_id if runs else None

    def start_run(self, name: str, parent_id: str | None = None, tags: dict[str, str] | None = None) -> str:
        all_tags = {"mlflow.runName": name, **(tags or {})}
        commit = git_commit()
        if commit:
            all_tags["mlflow.source.git.commit"] = commit
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        RunSink(self.uri, run_id).log_metrics(metrics, step)

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_dict(self, run_id: str, data: dict, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
            self.log_artifact(run_id, path)

    def register_model(self, name: str, run_id: str, artifact_path: str, tags: dict[str, str]) -> str:
        """A new version of registered model `name` pointing at the run's artifact directory; returns it."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name, description="latentforge DiT: safetensors + model config")
        except MlflowException as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
                raise
        version = self.client.create_model_version(name, f"runs:/{run_id}/{artifact_path}", run_id=run_id,
                                                   tags=tags)
        return version.version

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def sink(self, run_id: str) -> RunSink:
        return RunSink(self.uri, run_id)


@dataclass
class RunSink:
    """A picklable handle to one run, handed to Ray Train workers (rank 0 logs through it)."""

    uri: str
    run_id: str
    _client: Any = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {"uri": self.uri, "run_id": self.run_id, "_client": None}

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.uri)
        return self._client

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)
