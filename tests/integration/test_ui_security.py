"""What latentforge opens to the network: `latentforge ui` on loopback (a loud warning otherwise), MLflow basic
auth in front of it, and the local Ray head that `connect_ray` starts."""
from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests
from lf_services import free_port, stop_group

pytestmark = pytest.mark.integration

EXE = Path(sys.executable).parent / "latentforge"


def listening(pid: int) -> list[tuple[str, str]]:
    """(process name, address) of every listening TCP socket of a process and its descendants."""
    root = psutil.Process(pid)
    out = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            out += [(proc.name(), c.laddr.ip) for c in proc.net_connections(kind="inet") if c.status == "LISTEN"]
        except psutil.NoSuchProcess:
            continue
    return out


def wait_answering(url: str, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    """Until the server answers at all (with auth on, an anonymous /health may be refused)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode}"
        try:
            requests.get(url, timeout=2)
            return
        except requests.RequestException:
            time.sleep(0.5)
    raise TimeoutError(url)


def test_ui_with_basic_auth_on_loopback(tmp_path):
    from mlflow.tracking import MlflowClient

    workdir = tmp_path / "work"
    workdir.mkdir()
    MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").create_experiment("secured")
    port = free_port()
    env = {**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": "a-long-Admin-passw0rd"}
    env.pop("MLFLOW_AUTH_CONFIG_PATH", None)
    ui = subprocess.Popen([str(EXE), "ui", "--workdir", str(workdir), "--port", str(port), "--auth"], env=env,
                          cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_answering(f"{base}/health", ui)
        search = f"{base}/api/2.0/mlflow/experiments/search"
        assert requests.post(search, json={"max_results": 10}, timeout=10).status_code == 401
        assert requests.post(search, json={"max_results": 10}, auth=("admin", "wrong"), timeout=10).status_code == 401
        ok = requests.post(search, json={"max_results": 10}, auth=("admin", "a-long-Admin-passw0rd"), timeout=10)
        assert ok.status_code == 200 and "secured" in {e["name"] for e in ok.json()["experiments"]}
        assert (workdir / "basic_auth.db").exists() and not (tmp_path / "basic_auth.db").exists()
        # a tracking client authenticates through MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD
        client = subprocess.run(
            [sys.executable, "-c", "import sys; from mlflow.tracking import MlflowClient; "
             "print(MlflowClient(sys.argv[1]).get_experiment_by_name('secured').name)", base],
            env={**os.environ, "MLFLOW_TRACKING_USERNAME": "admin",
                 "MLFLOW_TRACKING_PASSWORD": "a-long-Admin-passw0rd"},
            capture_output=True, text=True, timeout=120)
        assert client.stdout.strip() == "secured", client.stderr[-2000:]
        sockets = listening(ui.pid)
        assert sockets and all(ipaddress.ip_address(ip).is_loopback for _, ip in sockets), sockets
    finally:
        stop_group(ui)


def test_ui_refuses_auth_without_an_admin_password_and_warns_off_loopback(tmp_path):
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_AUTH")}, "COLUMNS": "300"}
    done = subprocess.run([str(EXE), "ui", "--workdir", str(tmp_path), "--host", "0.0.0.0", "--auth"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in done.stdout
    assert "WARNING" in done.stdout and "0.0.0.0" in done.stdout and "reachable from the network" in done.stdout


def test_is_loopback():
    from latentforge.orchestration.ui import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.0.2.7")


RAY_HEAD = """
import json, os, sys, psutil, requests
from latentforge.orchestration.cluster import connect_ray
from latentforge.orchestration.config import RayConfig
connect_ray(RayConfig(num_cpus=1, object_store_mb=80), log_to_driver=False)
me = psutil.Process()
head, agent = [], []
for proc in [me, *me.children(recursive=True)]:
    for c in proc.net_connections(kind="inet"):
        if c.status == "LISTEN" and c.laddr.port == 8265:
            head.append([proc.name(), c.laddr.ip, c.laddr.port])
        if c.status == "LISTEN" and proc.name() == "ray::DashboardAgent":
            host = "[%s]" % c.laddr.ip if ":" in c.laddr.ip else c.laddr.ip
            try:  # the job API a dashboard head would forward to: refused without the token?
                status = requests.post(f"http://{host}:{c.laddr.port}/api/job_agent/jobs/",
                                       json={"entrypoint": "true"}, timeout=10).status_code
            except requests.RequestException:
                status = None  # not HTTP (the agent's gRPC port)
            agent.append([c.laddr.ip, c.laddr.port, status])
print(json.dumps({"auth_mode": os.environ.get("RAY_AUTH_MODE"), "dashboard": head, "agent": agent}), flush=True)
"""


def test_local_ray_head_has_token_auth_and_no_dashboard(tmp_path):
    """Ray's GCS and raylet listen on every interface (Ray has no bind-address option), so the local head must
    run with Ray's token authentication, and without its dashboard (an unauthenticated HTTP job API). Each node's
    dashboard agent still serves HTTP on every interface (52365: runtime envs, the job agent); its job API must
    refuse a request without the token. (This test used to assert no listener on 52365 at all, and passed only
    while another Ray on the machine held that port: run alone, the agent listens there.)"""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    done = subprocess.run([sys.executable, "-c", RAY_HEAD], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["auth_mode"] == "token"
    assert got["dashboard"] == []
    answered = {status for _, _, status in got["agent"] if status is not None}
    # The job API answers 401 without the token; the agent's other HTTP port (metrics) has no such route. When
    # another Ray on this machine holds 52365 (the suite's session cluster), the agent serves no job API at all.
    assert answered <= {401, 404, 405}, got["agent"]


def test_ui_serves_a_postgresql_store_and_refuses_unknown_schemes(tmp_path):
    from latentforge.orchestration.ui import UiError, server_command

    uri = "postgresql://mlflow@db.internal:5432/mlflow"
    server = server_command(tmp_path, 5001, backend_store_uri=uri, environ={})
    assert server.argv[server.argv.index("--backend-store-uri") + 1] == uri
    assert server.argv[server.argv.index("--host") + 1] == "127.0.0.1"
    with pytest.raises(UiError, match="expected sqlite"):
        server_command(tmp_path, 5001, backend_store_uri="./mlruns", environ={})
    with pytest.raises(UiError, match="no MLflow store"):
        server_command(tmp_path / "empty", 5001, environ={})


def test_ui_refuses_a_port_in_use_before_starting_and_names_a_free_one(tmp_path):
    import socket

    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        done = subprocess.run([str(EXE), "ui", "--workdir", str(tmp_path), "--port", str(port)],
                              env={**os.environ, "COLUMNS": "300"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"cannot start the UI: port {port} on 127.0.0.1 is in use" in done.stdout
    assert "MLflow UI at" not in done.stdout
    free = int(done.stdout.split("--port ")[1].split()[0])
    assert free > port
    with socket.create_server(("127.0.0.1", free)):  # the port it names is free indeed
        pass
