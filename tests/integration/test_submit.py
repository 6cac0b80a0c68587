"""`latentforge submit` for real: a Ray head with its Jobs API on loopback, a job that curates a tiny corpus,
its logs streamed back and its status as the exit code."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
import yaml
from lf_services import ray_auth_headers, ray_token_env, start_ray_head, stop_ray_head

from latentforge.datasets import manifest as mf
from latentforge.datasets.demo_corpus import DemoCorpusSpec, generate_demo_corpus

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head():
    # Ray's unix sockets live under the temp dir and their paths are limited to ~107 bytes: keep it short.
    temp = tempfile.mkdtemp(prefix="lfh", dir="/tmp")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # the job finds `latentforge`
    for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(k, None)
    env = ray_token_env(env)  # Ray 2.60 turns token auth on for new clusters: the head and the CLI share a token
    proc, url, gcs = start_ray_head(temp, num_cpus=4, env=env)
    try:
        yield url, env, gcs
    finally:
        stop_ray_head(proc)
        shutil.rmtree(temp, ignore_errors=True)


def submit(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "latentforge"), "submit", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600, check=False)  # the exit code is what the tests check


def jobs(url: str, env: dict) -> list[dict]:
    """The cluster's jobs from its REST API (the pytest process is not a Ray client of this cluster)."""
    return requests.get(f"{url}/api/jobs/", headers=ray_auth_headers(env), timeout=10).json()


def test_submit_runs_the_job_streams_its_logs_and_exits_with_its_status(tmp_path, ray_head):
    url, env, gcs = ray_head
    corpus, work, job_dir = tmp_path / "corpus", tmp_path / "work", tmp_path / "job"
    generate_demo_corpus(corpus, DemoCorpusSpec(num_images=4, num_videos=1, num_audio=1, seed=4, include_broken=False))
    job_dir.mkdir()
    (job_dir / "tiny.yaml").write_text(yaml.safe_dump({
        "name": "submitted", "workdir": str(work),
        "curation": {"name": "tiny", "input_dir": str(corpus), "samples_per_shard": 4, "image_size": 32}}))

    # A job that fails on the cluster (the config has no training plan): the submitter exits non-zero.
    failed = submit("tiny.yaml", "--address", url, "--working-dir", ".", "--command", "train", env=env, cwd=job_dir)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "config has no `training` section" in failed.stdout and "FAILED" in failed.stdout

    done = submit("job/tiny.yaml", "--address", url, "--working-dir", str(job_dir), "--command", "curate",
                  "--set", "curation.samples_per_shard=3", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "MLflow parent run" in done.stdout  # the job's own output, streamed
    # ... from a driver on this head's cluster, not on another Ray of the machine (see lf_services.HEAD_SCRIPT)
    assert f"Ray: {gcs} " in done.stdout
    assert "SUCCEEDED" in done.stdout
    ran = [j for j in jobs(url, env) if "latentforge curate tiny.yaml" in j["entrypoint"]]
    assert len(ran) == 1 and ran[0]["status"] == "SUCCEEDED"
    assert "--set curation.samples_per_shard=3" in ran[0]["entrypoint"]
    ds = mf.Dataset(work / "datasets" / "tiny")
    kept, rejected = ds.manifest().num_rows, ds.rejects().num_rows
    assert kept > 0 and kept == ds.card["num_samples"]
    assert ds.card["config"]["samples_per_shard"] == 3  # the override reached the job
    assert kept + rejected >= 6 and (work / "mlflow.db").exists()


def test_no_wait_returns_at_once_with_the_job_id(tmp_path, ray_head):
    url, env, _ = ray_head
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump({"name": "check", "workdir": str(tmp_path / "w")}))
    out = submit("ok.yaml", "--address", url, "--working-dir", str(tmp_path), "--command", "validate", "--no-wait",
                 env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = out.stdout.split("submitted ", 1)[1].split()[0]
    headers = ray_auth_headers(env)
    for _ in range(120):  # the job runs on without us
        job = requests.get(f"{url}/api/jobs/{job_id}", headers=headers, timeout=10).json()
        if job["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(1)
    assert job["status"] == "SUCCEEDED"
    logs = requests.get(f"{url}/api/jobs/{job_id}/logs", headers=headers, timeout=10).json()["logs"]
    assert "run 'check'" in logs


# Whether the stage trainer keeps Ray Train's placement-group cleaner, from a fresh driver (Ray picks its
# State API address once per process) connected to argv[1]: this head, or "local" for a new one with no
# dashboard.
PROBE = """
import sys, ray
from ray.train.torch import TorchTrainer
from latentforge.training.trainer import stage_trainer_class, state_api_answers
local = sys.argv[1] == "local"
ray.init(address=sys.argv[1], logging_level="ERROR", **(dict(num_cpus=1, include_dashboard=False) if local else {}))
print("answers", state_api_answers(), "plain", stage_trainer_class() is TorchTrainer)
ray.shutdown()
"""


@pytest.mark.heavy  # three drivers, two of them starting a Ray; test_resume checks the local head's side
def test_the_placement_group_cleaner_stays_only_where_the_state_api_knows_this_cluster(ray_head, ray_local):
    """On this head the State API answers for its own cluster: the stage trainer is Ray's, cleaner included. A
    local Ray without a dashboard whose State API address leads to this head's dashboard (as the default
    127.0.0.1:8265 does on a machine where another Ray's dashboard holds it) gets answers about this cluster:
    Ray's cleaner would find no controller there, take ours for dead and remove our workers' placement group
    mid-stage. There the probe says no, and the cleaner is left out. `ray_local` is up too: with several Ray
    clusters on the machine the probe must name its own (Ray refuses to guess: ConnectionError)."""
    url, env, gcs = ray_head

    def probe(address: str, **extra: str) -> str:
        done = subprocess.run([sys.executable, "-c", PROBE, address], env={**env, **extra}, capture_output=True,
                              text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout.strip().splitlines()[-1]

    assert probe(gcs) == "answers True plain True"
    # The same user's token, so the other dashboard does answer (with another token it refuses: also "no").
    assert probe("local", RAY_API_SERVER_ADDRESS=url) == "answers False plain False"
    # A driver that started its own Ray (as `latentforge run` does) beside the other two: no State API of its own.
    assert probe("local") == "answers False plain False"
