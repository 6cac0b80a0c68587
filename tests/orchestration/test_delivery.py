"""The delivery queue against a port nobody listens on: nothing raises, records are spooled as JSON lines,
the queue stays bounded, and the warnings say exactly what was dropped or left undelivered."""
from __future__ import annotations

import json
import logging
import socket

from latentforge.orchestration.delivery import DeliveryQueue, describe, groups, metric_records


def closed_port_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there once the socket is closed


def test_an_unreachable_server_spools_bounded_records_and_names_what_was_dropped(tmp_path, caplog):
    spool = tmp_path / "spool" / "run.jsonl"
    queue = DeliveryQueue(closed_port_uri(), spool, max_records=5)
    with caplog.at_level(logging.WARNING, logger="latentforge.tracking"):
        for step in range(8):
            queue.put(*metric_records("r1", {"loss": 1.0}, step))  # never raises
        queue.put({"kind": "param", "run_id": "r1", "key": "lr", "value": "0.1"})
        assert not queue.close(timeout_s=0)
    lines = [json.loads(line) for line in spool.read_text().splitlines()]
    assert [r.get("step") for r in lines] == [4, 5, 6, 7, None]  # the newest metric points and the param
    assert lines[-1] == {"kind": "param", "run_id": "r1", "key": "lr", "value": "0.1"}
    text = caplog.text
    assert "unreachable" in text
    assert "dropped the oldest" in text and "r1/loss steps 0-3 (4 points)" in text
    assert "5 records undelivered" in text and str(spool) in text


def test_batches_respect_mlflow_limits_and_run_boundaries():
    records = metric_records("a", {f"m{i}": 1.0 for i in range(1500)}, 0) + metric_records("b", {"x": 1.0}, 0)
    records.append({"kind": "terminate", "run_id": "b", "status": "FINISHED", "end_time": 0})
    got = groups(records)
    assert [len(g) for g in got] == [1000, 500, 1, 1]
    assert describe(got[-1]) == "terminate FINISHED"
