"""The console script for real: `latentforge curate` on an existing Ray cluster, then `latentforge ui`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from lf_services import free_port, stop_group, wait_http

pytestmark = pytest.mark.integration


def latentforge(*args: str, env: dict, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "latentforge"
    return subprocess.run([str(exe), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_curate_then_ui_serves_the_runs(tmp_path, ray_local, repo_root):
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    env.pop("MLFLOW_TRACKING_URI", None)
    corpus = tmp_path / "corpus"
    done = latentforge("demo-corpus", str(corpus), "--seed", "5", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # shrink the corpus: keep a few files of each kind plus all broken ones
    for kind, keep in (("images", 6), ("videos", 3), ("audio", 3)):
        for media in sorted(p for p in (corpus / kind).iterdir() if p.suffix != ".txt")[keep:]:
            media.unlink()
            media.with_suffix(".txt").unlink(missing_ok=True)

    done = latentforge("curate", str(repo_root / "configs" / "quickstart.yaml"), "--set", "workdir=work",
                       "--set", f"curation.input_dir={corpus}", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "latentforge ui --workdir" in done.stdout
    workdir = tmp_path / "work"
    assert (workdir / "mlflow.db").exists() and (workdir / "datasets" / "demo" / "card.json").exists()

    port = free_port()
    exe = Path(sys.executable).parent / "latentforge"
    ui = subprocess.Popen([str(exe), "ui", "--workdir", str(workdir), "--port", str(port)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/health", ui)
        runs = requests.post(f"{base}/api/2.0/mlflow/runs/search",
                             json={"experiment_ids": [_experiment_id(base)]}, timeout=10).json()["runs"]
        by_name = {r["info"]["run_name"]: r for r in runs}
        assert {"quickstart", "curate-demo"} <= set(by_name)
        metrics = {m["key"]: m["value"] for m in by_name["curate-demo"]["data"]["metrics"]}
        assert metrics["kept"] >= 10 and metrics["rejected"] >= 8
        listing = requests.get(f"{base}/api/2.0/mlflow/artifacts/list",
                               params={"run_id": by_name["curate-demo"]["info"]["run_id"], "path": "dataset"},
                               timeout=10).json()
        assert "dataset/card.json" in {f["path"] for f in listing["files"]}
    finally:
        stop_group(ui)


def _experiment_id(base: str) -> str:
    got = requests.get(f"{base}/api/2.0/mlflow/experiments/get-by-name",
                       params={"experiment_name": "latentforge"}, timeout=10).json()
    return got["experiment"]["experiment_id"]


def test_misspelled_key_fails_before_anything_starts(tmp_path, repo_root):
    bad = tmp_path / "bad.yaml"
    bad.write_text((repo_root / "configs" / "quickstart.yaml").read_text().replace("samples_per_shard", "samples_per_shrd"))
    done = latentforge("run", str(bad), env=dict(os.environ), cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert "curation.samples_per_shrd" in done.stdout and "unknown key" in done.stdout
    assert not (tmp_path / "lf-work").exists()
