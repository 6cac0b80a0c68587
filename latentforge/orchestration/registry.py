"""Trained stages in MLflow: a registered model version or a stage run's artifacts, fetched for the commands
that read an export (`generate`, `verify`)."""
from __future__ import annotations

from pathlib import Path

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def is_mlflow_uri(source: str) -> bool:
    return source.startswith(MLFLOW_SCHEMES)


def export_source(source: str, tracking_uri: str | None, scratch: Path) -> Path:
    """A local directory (or file) holding what `source` names: itself, or an MLflow URI's artifacts downloaded
    under `scratch` (see fetch_artifacts)."""
    return fetch_artifacts(source, tracking_uri, scratch) if is_mlflow_uri(source) else Path(source)


def fetch_artifacts(uri: str, tracking_uri: str | None, dst: Path) -> Path:
    """The artifacts a `models:/NAME/VERSION` (or `models:/NAME@ALIAS`, `models:/NAME/latest`) or `runs:/RUN/PATH`
    URI names, downloaded under `dst`. The registry is asked through a client of its own on `tracking_uri`
    (default: $MLFLOW_TRACKING_URI): mlflow's global tracking and registry URIs are left as they are."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    asked = uri  # what the user typed, named in errors (the download URI it resolves to means little to them)
    try:
        if uri.startswith("models:/"):
            client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
            ref = uri[len("models:/"):]
            if "@" in ref:
                name, alias = ref.split("@", 1)
                version = client.get_model_version_by_alias(name, alias).version
            else:
                name, _, version = ref.rpartition("/")
                if not name:
                    raise ValueError(f"{uri}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
                if version == "latest":
                    found = client.search_model_versions(f"name = '{name}'")
                    if not found:
                        raise ValueError(f"registered model {name!r} has no version")
                    version = str(max(int(v.version) for v in found))
            uri = client.get_model_version_download_uri(name, version)
        return Path(download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=tracking_uri))
    except MlflowException as e:
        raise ValueError(f"{asked}: {e.message}" + (f" (downloading {uri})" if uri != asked else "")) from e
