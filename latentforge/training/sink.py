"""Where a training worker sends metrics and files. The loop never knows which tracker is behind it."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol


class MetricSink(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def start(self) -> None: ...  # on the logging rank, before the first step (e.g. system metrics)

    def close(self) -> None: ...  # after the last step: deliver what is queued


class NullSink:
    """Drops everything: lets the loop log unconditionally (ranks other than 0, tests without tracking)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass
