"""Helpers for tests that start real servers on loopback."""
from __future__ import annotations

import socket
import subprocess
import time

import requests


def init_local_ray():
    """The single-node Ray of conftest.ray_local (keep the two alike): test_multinode puts it back with this."""
    import ray

    ray.init(num_cpus=4, object_store_memory=512 * 2**20, include_dashboard=False, log_to_driver=False)
    return ray


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Stop a server started with start_new_session=True, and every worker it spawned."""
    import os
    import signal

    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120.0, headers: dict | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            if requests.get(url, timeout=2, headers=headers).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


# A process that owns a real Ray head with its dashboard (the Jobs API server) on loopback, until its stdin
# closes. `ray start` would daemonise the head, and `ray stop` kills every Ray process of the machine
# (other people's included), so the head lives in a driver we own and ends with `ray.shutdown()`.
# Through ray.cluster_utils.Cluster rather than ray.init: only RayParams takes the dashboard agent's port, and its
# default (52365) is held by any other local Ray on the machine (the session's ray_local), whose agent would then
# be the only one listening and this head's Jobs API would answer "No available agent to submit job".
# The job supervisor gives each driver RAY_ADDRESS from canonicalize_bootstrap_address_or_die("auto", temp_dir):
# the address in <temp_dir>/ray_current_cluster, which only `ray start` writes; without it, any raylet's
# --gcs-address found in `ps`. With another Ray on the machine (ray_local, the multinode Cluster, a colleague's)
# the driver could then dial that cluster's GCS with this head's token and fail InvalidAuthToken. So the head
# records its own address there, as `ray start` does (same call).
HEAD_SCRIPT = """
import json, sys, ray
from ray._private.utils import write_ray_address
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, connect=True, head_node_args=dict(
    num_cpus=int(sys.argv[1]), object_store_memory=256 * 2**20, include_dashboard=True,
    dashboard_host="127.0.0.1", dashboard_port=int(sys.argv[2]), dashboard_agent_listen_port=int(sys.argv[4]),
    temp_dir=sys.argv[3]))
gcs = ray.get_runtime_context().gcs_address
write_ray_address(gcs, sys.argv[3])
print(json.dumps({"gcs": gcs}), flush=True)
sys.stdin.read()
ray.shutdown()
cluster.shutdown()
"""


def quiet_port(low: int = 20000, high: int = 30000, taken: tuple[int, ...] = ()) -> int:
    """A free port below Linux's ephemeral range (32768+) and above Ray's worker ports (10002-19999): one that
    no process binding port 0 (every Ray worker of the session's local Ray does) can take between this choice
    and the server's start."""
    import random

    for port in random.sample(range(low, high), 200):
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


def start_ray_head(temp_dir: str, num_cpus: int, env: dict, attempts: int = 3) -> tuple[subprocess.Popen, str, str]:
    """A real Ray head with its Jobs API: (process, dashboard URL, GCS address). Stop it with stop_ray_head.

    The Jobs API needs the head's dashboard agent, on its own port; a head whose agent never came up (its port
    taken meanwhile: CI saw "No available agent to submit job" for minutes) is stopped and started afresh."""
    import json
    import sys

    for attempt in range(attempts):
        port = quiet_port()
        agent = quiet_port(taken=(port,))
        proc = subprocess.Popen([sys.executable, "-c", HEAD_SCRIPT, str(num_cpus), str(port), temp_dir, str(agent)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
        line = proc.stdout.readline()
        if not line:
            stop_group(proc)
            raise RuntimeError(f"the Ray head exited with {proc.wait()} before starting")
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/api/version", proc, headers=ray_auth_headers(env))
        if agent_ready(url, env) or attempt == attempts - 1:
            return proc, url, json.loads(line)["gcs"]
        stop_ray_head(proc)
    raise AssertionError("unreachable")


def agent_ready(url: str, env: dict, wait_s: float = 90.0) -> bool:
    """Whether the head accepts a job (a no-op one) within `wait_s`: its Jobs API answers 500 "No available
    agent" until the dashboard agent is up."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        answer = requests.post(f"{url}/api/jobs/", json={"entrypoint": "true"}, headers=ray_auth_headers(env),
                               timeout=30)
        if answer.ok:
            return True
        if "No available agent" not in answer.text:
            answer.raise_for_status()
        time.sleep(2.0)
    return False


def ray_token_env(env: dict) -> dict:
    """`env` with Ray token auth on and a fresh token of its own (not the user's ~/.ray/auth_token)."""
    import secrets

    return {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def ray_auth_headers(env: dict) -> dict:
    return {"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"} if env.get("RAY_AUTH_TOKEN") else {}


def stop_ray_head(proc: subprocess.Popen) -> None:
    try:
        proc.stdin.close()  # the driver shuts its head down cleanly
        proc.wait(timeout=60)
    except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
        stop_group(proc)
