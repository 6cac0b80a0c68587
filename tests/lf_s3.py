"""A real S3-compatible HTTP server on loopback for storage tests: moto's server mode as a subprocess.

Import the fixtures into a test module (or a conftest): `from lf_s3 import s3_server, s3_bucket  # noqa: F401`.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass

import pytest

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "lf-test-key", "AWS_SECRET_ACCESS_KEY": "lf-test-secret",
               "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str

    def create_bucket(self, name: str) -> str:
        import pyarrow.fs as pafs

        host = self.endpoint_url.split("://", 1)[1]
        fs = pafs.S3FileSystem(endpoint_override=host, scheme="http", region="us-east-1",
                               access_key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                               secret_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], allow_bucket_creation=True)
        fs.create_dir(name)
        return name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"moto_server did not answer on {url} within {timeout}s")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto_server on 127.0.0.1 with the AWS variables pointing at it for the session (restored after)."""
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or "moto_server"
    port = _free_port()
    log_path = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL_S3": url}
    saved = {k: os.environ.get(k) for k in env}
    try:
        _wait(url, proc)
        os.environ.update(env)
        yield S3Server(url)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh bucket per test: `s3://NAME/...`."""
    return s3_server.create_bucket(f"lf-{uuid.uuid4().hex[:12]}")
