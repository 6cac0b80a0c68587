"""Tracking through an MLflow outage: a real `mlflow server` is stopped mid-run and restarted on the same store
and port; logging never raises or stalls, and every record arrives once the server is back."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import start_mlflow_server
from lf_services import free_port, stop_group

from latentforge.orchestration.delivery import replay_spool
from latentforge.orchestration.tracking import Tracker

pytestmark = pytest.mark.integration


def wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.2)


def steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


CRASHING_WORKER = """
import os, sys
from latentforge.orchestration.tracking import RunSink
sink = RunSink(sys.argv[1], sys.argv[2], sys.argv[3])
for step in range(1, 6):
    sink.log_metrics({"crashed_worker_loss": 0.5}, step)
sink.queue.deliver_once()  # fails: the server is down, so the records go to the spool file
os._exit(9)  # dies without closing: only the spool file remembers
"""


def test_metrics_params_and_tags_survive_a_server_restart(tmp_path):
    root, port = tmp_path / "server", free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(root, port)
    try:
        tracker = Tracker(uri, "outage", spool_dir=tmp_path / "spool")
        run_id = tracker.start_run("train-s")
        sink = tracker.sink(run_id)
        for step in range(10):
            sink.log_metrics({"loss": 1.0 / (step + 1)}, step)
        assert sink.queue.close(timeout_s=30)

        stop_group(server)  # the outage
        for step in range(10, 30):
            sink.log_metrics({"loss": 1.0 / (step + 1)}, step)
        tracker.log_params(run_id, {"lr": 0.001})
        tracker.set_tags(run_id, {"latentforge.note": "logged while the server was down"})
        tracker.end_run(run_id)
        wait_until(lambda: not sink.queue.healthy and not tracker.queue.healthy)
        spooled = [json.loads(line) for f in sorted((tmp_path / "spool").glob("driver-*.jsonl"))
                   for line in f.read_text().splitlines()]
        spooled += [json.loads(line) for line in sink.queue.spool_file.read_text().splitlines()]
        assert {r["step"] for r in spooled if r["kind"] == "metric"} == set(range(10, 30))
        assert {r["kind"] for r in spooled} == {"metric", "param", "tag", "terminate"}

        # a worker that dies during the outage leaves only its spool file behind
        done = subprocess.run([sys.executable, "-c", CRASHING_WORKER, uri, run_id, str(tmp_path / "spool")],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 9, done.stderr
        assert "unreachable" in done.stderr  # the warning says what happened

        # the next stage's run is opened while the server is away: that waits for it, then creates it once
        opened: dict = {}
        opener = threading.Thread(target=lambda: opened.update(
            run=tracker.resume_or_start("train-next", wait_s=600)))
        opener.start()

        server = start_mlflow_server(root, port)  # same store, same port
        opener.join(timeout=300)
        assert opened["run"][1] is False
        assert [r.info.run_id for r in tracker.client.search_runs(
            [tracker.experiment_id], "tags.mlflow.runName = 'train-next'")] == [opened["run"][0]]
        for step in range(30, 40):
            sink.log_metrics({"loss": 1.0 / (step + 1)}, step)
        assert sink.close(timeout_s=60) and tracker.close(timeout_s=60)
        assert steps(tracker.client, run_id, "loss") == list(range(40))
        assert replay_spool(uri, tmp_path / "spool") == 5  # the dead worker's records
        assert steps(tracker.client, run_id, "crashed_worker_loss") == list(range(1, 6))
        run = tracker.client.get_run(run_id)
        assert run.data.params["lr"] == "0.001"
        assert run.data.tags["latentforge.note"] == "logged while the server was down"
        assert run.info.status == "FINISHED"
        assert not list((tmp_path / "spool").glob("*.jsonl"))  # delivered: nothing left to replay
    finally:
        stop_group(server)


class LatePort:
    """A local port that refuses connections until `open()`, then forwards them to `target` (a running server):
    the server 'comes up' at a moment the test chooses, without waiting for a second server start."""

    def __init__(self, target: int):
        self.port, self.target, self.listener = free_port(), target, None

    def open(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


@pytest.mark.timeout(180)
def test_a_tracker_started_while_the_server_is_down_waits_for_it(mlflow_server, tmp_path, caplog):
    """The server 'comes up' a second after the tracker starts (a port that refuses, then forwards to the
    session's server): the tracker waits for it, as opening a run does, instead of failing at once."""
    late = LatePort(int(mlflow_server.rsplit(":", 1)[1]))
    threading.Timer(1.0, late.open).start()  # the server comes up a moment after the tracker starts
    try:
        started = time.time()
        with caplog.at_level("WARNING", logger="latentforge"):
            tracker = Tracker(f"http://127.0.0.1:{late.port}", "late-server", spool_dir=tmp_path / "spool")
        assert time.time() - started >= 1.0
        assert any("unreachable" in r.getMessage() and "retrying" in r.getMessage() for r in caplog.records)
        run_id = tracker.start_run("r")
        assert tracker.client.get_run(run_id).info.experiment_id == tracker.experiment_id
        assert tracker.close(timeout_s=30)
    finally:
        late.close()


def test_the_wait_for_a_server_at_start_is_configurable(tmp_path):
    from mlflow.exceptions import MlflowException

    started = time.time()
    with pytest.raises(MlflowException):
        Tracker(f"http://127.0.0.1:{free_port()}", "nobody-there", wait_s=0)
    assert time.time() - started < 30
