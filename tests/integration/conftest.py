"""Real services for integration tests: a local Ray and an `mlflow server` over HTTP on loopback."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from lf_s3 import s3_bucket, s3_server  # noqa: F401  (moto_server on loopback, for the s3:// tests)
from lf_services import free_port, stop_group, wait_http


def mlflow_executable() -> str:
    return shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"


def start_mlflow_server(root: Path, port: int, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port with its SQLite store and artifacts under `root` (reused when they exist,
    so a stopped server can be restarted on the same store and port). Stop it with lf_services.stop_group."""
    root.mkdir(parents=True, exist_ok=True)
    log = open(root / "server.log", "ab")
    try:
        proc = subprocess.Popen(
            [mlflow_executable(), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", (root / "artifacts").as_uri(), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", *extra],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})})
    finally:
        log.close()  # the child holds its own descriptor
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc)
    except BaseException:
        stop_group(proc)
        raise
    return proc


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (SQLite store, proxied artifacts) bound to 127.0.0.1."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [mlflow_executable(), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", (root / "artifacts").as_uri(), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc)
        yield url
    finally:
        stop_group(proc)
        log.close()


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray sized like the CLI's embedded default on a small machine."""
    import ray

    # address="local": a new cluster even when `ray start` left one on this (shared) machine
    ray.init(address="local", num_cpus=4, object_store_memory=512 * 2**20, include_dashboard=False,
             log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]
