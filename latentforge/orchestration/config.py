"""The root config: one YAML file composing each component's config; unknown keys fail with their path."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from latentforge.datasets import storage
from latentforge.datasets.storage import StorageConfig
from latentforge.orchestration.config_text import DuplicateKeyError, format_errors, load_yaml
from latentforge.pipelines.config import CurationConfig
from latentforge.training.config import PlanConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RayConfig(Strict):
    """How to reach Ray: an existing cluster (`address` or RAY_ADDRESS), else a local one sized here."""

    address: str | None = Field(None, description="cluster address; default: RAY_ADDRESS, else start locally")
    num_cpus: int | None = Field(None, ge=1, description=(
        "logical CPUs of a local Ray; default 2x the cores this process may use (its CPU affinity), >= 4"))
    object_store_mb: int = Field(1024, ge=64, description="object store of a local Ray (MiB)")


class TrackingConfig(Strict):
    """MLflow: a URI (or MLFLOW_TRACKING_URI), else a SQLite store in the workdir with artifacts beside it."""

    uri: str | None = Field(None, description="tracking URI; default MLFLOW_TRACKING_URI, else WORKDIR/mlflow.db")
    experiment: str = "latentforge"
    registered_model: str | None = Field(
        None, description="model registry name for the plan's final stage; default: the run name")
    system_metrics: bool = Field(True, description="sample CPU/memory/disk/network/GPU use of each training stage")
    system_metrics_interval_s: float = Field(10.0, gt=0, description="seconds between system metric samples")


class LatentforgeConfig(Strict):
    """A whole run: curation, then the training plan, tracked under one MLflow parent run."""

    name: str = Field("latentforge", pattern=r"^[A-Za-z0-9_-]+$", description="run name (resume key)")
    workdir: Path = Field(Path("lf-work"), description="datasets, checkpoints and the MLflow store go here")
    ray: RayConfig = RayConfig()
    tracking: TrackingConfig = TrackingConfig()
    curation: CurationConfig = CurationConfig()
    training: PlanConfig | None = None
    storage: StorageConfig = Field(StorageConfig(), description=(
        "object stores (s3://): endpoint, region, local cache, checkpoint location; credentials stay in the env"))

    @field_validator("workdir", mode="before")
    @classmethod
    def _local_workdir(cls, value):
        if isinstance(value, str) and storage.is_remote(value):
            raise ValueError("must be a local directory (it holds the MLflow store, state and exports); put data "
                             "on an object store with curation.input_dir / output_dir, training.datasets and "
                             "storage.checkpoint_uri")
        return value

    def dataset_dirs(self) -> list[Path]:
        if self.training and self.training.datasets:
            return list(self.training.datasets)
        return [self.curation.output_dir or self.workdir / "datasets" / self.curation.name]

    def config_hash(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]


class ConfigError(ValueError):
    """A config that cannot be used; the message names each offending key by its dotted path."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value parsed as a YAML scalar/list)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key segment")
    try:
        return parts, load_yaml(raw) if raw.strip() else ""
    except DuplicateKeyError as e:
        raise ConfigError(f"override {text!r}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from None


def apply_override(data: dict, parts: list[str], value: Any) -> None:
    node: Any = data
    created = False  # node is a section this override made up (the config does not have it)
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_index(parts, i, len(node))]
        else:
            _no_missing_item(node, parts, i, created)
            created = created or part not in node
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {'.'.join(parts)}: {'.'.join(parts[:i + 1])} is not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[_index(parts, len(parts) - 1, len(node))] = value
    else:
        _no_missing_item(node, parts, len(parts) - 1, created)
        node[last] = value


def _no_missing_item(node: dict, parts: list[str], i: int, created: bool) -> None:
    """A numeric segment names a list item: refuse it where the config has no such list, rather than create a
    section that the validator then calls 'not a valid list'."""
    if parts[i].isdigit() and parts[i] not in node:
        where = ".".join(parts[:i]) or "(root)"
        why = f"the config has no {where} list; write it in the config file" if created or not node else \
            f"{where} is a section, not a list"
        raise ConfigError(f"override {'.'.join(parts)}: no list item {parts[i]} under {where} to override ({why})")


def _index(parts: list[str], i: int, length: int) -> int:
    where = ".".join(parts[:i])
    if parts[i].isdigit() and int(parts[i]) >= length:
        raise ConfigError(f"override {'.'.join(parts)}: no list item {parts[i]} under {where} to override "
                          f"({parts[i]!r} is not an index below {length})")
    if not parts[i].isdigit():
        raise ConfigError(f"override {'.'.join(parts)}: {parts[i]!r} is not an index below {length} "
                          f"({where} is a list)")
    return int(parts[i])


def load_config(path: str | Path | None, overrides: list[str] = ()) -> LatentforgeConfig:
    """Read YAML (safe_load, refusing duplicate keys), apply `--set` overrides, validate; raise ConfigError
    naming bad keys."""
    data: dict = {}
    source = str(path) if path else "(defaults)"
    if path:
        try:
            data = load_yaml(Path(path).read_text()) or {}
        except DuplicateKeyError as e:
            raise ConfigError(f"{source}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from e
        except OSError as e:
            raise ConfigError(f"{source}: cannot read: {e.strerror}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the top level must be a mapping")
    for text in overrides:
        apply_override(data, *parse_override(text))
    try:
        return LatentforgeConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e, source, LatentforgeConfig)) from None


def resolve_paths(cfg: LatentforgeConfig, base: Path) -> LatentforgeConfig:
    """Make relative paths absolute against `base` (the current directory), so Ray workers agree on them."""
    workdir = (base / cfg.workdir).resolve()
    cur = cfg.curation
    curation = cur.model_copy(update={
        "input_dir": _absolute(base, cur.input_dir),
        "output_dir": _absolute(base, cur.output_dir) if cur.output_dir else workdir / "datasets" / cur.name,
    })
    training = cfg.training
    if training is not None:
        datasets = [_absolute(base, d) for d in training.datasets] or [curation.output_dir]
        training = training.model_copy(update={"datasets": datasets})
    st = cfg.storage
    store = st.model_copy(update={
        "cache_dir": (base / st.cache_dir).resolve() if st.cache_dir else None,
        "checkpoint_uri": str(_absolute(base, st.checkpoint_uri)) if st.checkpoint_uri else None})
    return cfg.model_copy(update={"workdir": workdir, "curation": curation, "training": training, "storage": store})


def _absolute(base: Path, location: Path | str) -> Path | str:
    """A local path made absolute; a URI (s3://...) as it is."""
    location = storage.as_location(location)
    return location if storage.is_remote(location) else (base / location).resolve()
