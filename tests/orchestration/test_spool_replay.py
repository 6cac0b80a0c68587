"""Replaying a spool file: records leave the file as they are delivered, so a replay cut short by another
outage does not send them again; an artifact whose kept copy is gone is dropped (named in a warning) instead of
passing for an outage that blocks every record behind it. A real SQLite MLflow store; the outage is a port
nobody listens on."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from latentforge.orchestration import delivery
from latentforge.orchestration.delivery import (
    DeliveryQueue,
    LocalRecordError,
    artifact_record,
    is_permanent,
    metric_records,
    replay_spool,
)

UNREACHABLE = "http://127.0.0.1:1"  # nothing listens on port 1: connection refused at once


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("mlflow")  # one store for the module: creating its tables takes seconds
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    return uri, client, client.create_experiment("replay", artifact_location=(root / "arts").as_uri())


@pytest.fixture
def store(experiment):
    uri, client, exp = experiment
    return uri, client, client.create_run(exp).info.run_id


def spool_during_an_outage(spool_dir: Path, run_id: str, tmp_path: Path, caplog) -> Path:
    """What a process that logged during an outage and then died leaves: its spool file (and artifact copies)."""
    spool = spool_dir / f"{run_id}-123.jsonl"
    (tmp_path / "sample.png").write_bytes(b"png")
    queue = DeliveryQueue(UNREACHABLE, spool)
    queue.put(artifact_record(run_id, tmp_path / "sample.png", "samples", spool_dir))
    queue.put(*metric_records(run_id, {"loss": 0.5}, 7))
    queue.put({"kind": "param", "run_id": run_id, "key": "lr", "value": "0.1"})
    queue.close(timeout_s=0)
    if queue._thread is not None:
        queue._thread.join(timeout=30)  # the process is gone: nothing of it touches the file any more
    assert len(spool.read_text().splitlines()) == 3
    caplog.clear()  # what the replay says is what counts
    return spool


def test_a_replay_cut_short_keeps_only_the_undelivered_records(store, tmp_path, monkeypatch, caplog):
    uri, client, run_id = store
    spool_dir = tmp_path / "spool"
    spool = spool_during_an_outage(spool_dir, run_id, tmp_path, caplog)

    real = delivery.deliver

    def server_gone_after_the_artifact(client_, group):
        if group[0]["kind"] != "artifact":
            raise ConnectionError("server gone again")
        return real(client_, group)

    monkeypatch.setattr(delivery, "deliver", server_gone_after_the_artifact)
    with caplog.at_level(logging.WARNING, logger="latentforge.tracking"):
        assert replay_spool(uri, spool_dir, timeout_s=0) == 1
    assert [a.path for a in client.list_artifacts(run_id, "samples")] == ["samples/sample.png"]
    left = [json.loads(line) for line in spool.read_text().splitlines()]
    assert [r["kind"] for r in left] == ["metric", "param"]  # the uploaded artifact left the spool file
    assert "DROPPED" not in caplog.text and f"kept in {spool}" in caplog.text  # they are still on disk

    monkeypatch.setattr(delivery, "deliver", real)  # the server is back
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="latentforge.tracking"):
        start = time.time()
        assert replay_spool(uri, spool_dir) == 2
    assert time.time() - start < 10
    assert not spool.exists()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(7, 0.5)]
    assert client.get_run(run_id).data.params == {"lr": "0.1"}
    assert "unreachable" not in caplog.text and "cannot send" not in caplog.text


def test_an_artifact_whose_copy_is_gone_is_dropped_and_the_rest_delivered(store, tmp_path, caplog):
    uri, client, run_id = store
    spool_dir = tmp_path / "spool"
    spool = spool_during_an_outage(spool_dir, run_id, tmp_path, caplog)
    gone = Path(json.loads(spool.read_text().splitlines()[0])["path"])
    gone.unlink()  # e.g. uploaded by a replay that died before it could update the spool file
    with caplog.at_level(logging.WARNING, logger="latentforge.tracking"):
        start = time.time()
        assert replay_spool(uri, spool_dir) == 2  # the metric and the param
    assert time.time() - start < 10  # no outage: nothing waits for the close() timeout
    assert not spool.exists()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(7, 0.5)]
    assert client.get_run(run_id).data.params == {"lr": "0.1"}
    assert "unreachable" not in caplog.text
    assert "artifact samples" in caplog.text and str(gone) in caplog.text and "dropped" in caplog.text


def test_a_replay_while_the_server_is_away_keeps_the_whole_file(store, tmp_path, caplog):
    _, _, run_id = store
    spool_dir = tmp_path / "spool"
    spool = spool_during_an_outage(spool_dir, run_id, tmp_path, caplog)
    before = spool.read_text()
    with caplog.at_level(logging.WARNING, logger="latentforge.tracking"):
        assert replay_spool(UNREACHABLE, spool_dir, timeout_s=0) == 0
    assert spool.read_text() == before
    assert Path(json.loads(before.splitlines()[0])["path"]).is_file()  # the artifact copy stays for the next try
    assert "DROPPED" not in caplog.text and f"kept in {spool}" in caplog.text


def test_local_failures_are_permanent_and_outages_are_not():
    assert is_permanent(LocalRecordError("gone"))
    assert not is_permanent(ConnectionError("refused")) and not is_permanent(FileNotFoundError("x"))
