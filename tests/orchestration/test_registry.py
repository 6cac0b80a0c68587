"""`registry.fetch_artifacts`: models:/ and runs:/ URIs resolved through a client of its own, on a real MLflow
SQLite store (the HTTP server's path is covered by the quickstart integration test)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from latentforge.orchestration.registry import fetch_artifacts


@pytest.fixture()
def registry(tmp_path):
    """A SQLite tracking store with model `m`: version 1 from one run, version 2 (alias `best`) from another."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))
    client.create_registered_model("m")
    for text in ("one", "two"):
        run = client.create_run(exp)
        (tmp_path / text).mkdir()
        (tmp_path / text / "weights.txt").write_text(text)
        client.log_artifacts(run.info.run_id, str(tmp_path / text), "model")
        client.set_terminated(run.info.run_id)
        version = client.create_model_version("m", f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_registered_model_alias("m", "best", version.version)
    assert mlflow.get_tracking_uri() != uri  # the fixture left mlflow's global URI alone, as fetch_artifacts must
    return uri, client, tmp_path


@pytest.mark.parametrize("ref, text", [("m/1", "one"), ("m/2", "two"), ("m/latest", "two"), ("m@best", "two")])
def test_model_uris_resolve_to_their_versions(registry, ref, text):
    import mlflow

    uri, _, tmp_path = registry
    before = mlflow.get_tracking_uri()
    got = fetch_artifacts(f"models:/{ref}", uri, tmp_path / "dst")
    assert (got / "weights.txt").read_text() == text
    assert mlflow.get_tracking_uri() == before


def test_bad_uris_are_named(registry):
    uri, client, tmp_path = registry
    with pytest.raises(ValueError, match="models:/nope/1: "):
        fetch_artifacts("models:/nope/1", uri, tmp_path / "dst")
    with pytest.raises(ValueError, match="expected models:/NAME/VERSION"):
        fetch_artifacts("models:/m", uri, tmp_path / "dst")
    client.create_registered_model("empty")
    with pytest.raises(ValueError, match="'empty' has no version"):
        fetch_artifacts("models:/empty/latest", uri, tmp_path / "dst")


def test_a_version_whose_artifacts_are_gone_names_the_uri_asked_for(registry):
    uri, _, tmp_path = registry
    shutil.rmtree(tmp_path / "artifacts")
    with pytest.raises(ValueError) as info:
        fetch_artifacts("models:/m@best", uri, Path(tmp_path / "dst"))
    assert str(info.value).startswith("models:/m@best: ")  # not only the runs:/ URI it resolved to
    assert "(downloading runs:/" in str(info.value)
