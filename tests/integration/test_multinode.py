"""Chaos on a real multi-node Ray (ray.cluster_utils.Cluster: a head and two worker nodes on this machine):
a worker node removed under a running curation job or training stage, and a curation driver killed with
SIGKILL and rerun. Each ends with every input exactly once in the dataset, or with the stage resumed from its
last checkpoint.

The head has no CPUs, so stage actors, tasks and train workers all run on the worker nodes that get removed.
The job finishes on the remaining worker node; a fresh node is added after each test (what KubeRay or the
autoscaler would do), so the module's cluster keeps its shape for the next test.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from latentforge.datasets import manifest as mf
from latentforge.datasets.demo_corpus import DemoCorpusSpec, generate_demo_corpus
from latentforge.datasets.verify import verify_dataset
from latentforge.pipelines.config import CurationConfig
from latentforge.pipelines.curate import STAGES, run_curation
from latentforge.pipelines.discover import discover
from latentforge.pipelines.resume import DONE_DIR

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Logical CPUs: one worker node alone must hold every stage's actor pool (sized for both) once the other is lost.
NODE = {"num_cpus": 4, "object_store_memory": 192 * 2**20}
# Node loss is noticed after health_check_failure_threshold missed checks: ~5 s here instead of ~30 s, with
# slack for a loaded 2-core machine (a live but slow raylet must not be declared dead).
HEALTH = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000, "health_check_timeout_ms": 2000,
          "health_check_failure_threshold": 5}


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    was_local = ray.is_initialized()  # the session's single-node Ray (ray_local), if an earlier module made it
    if was_local:
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 128 * 2**20,
                                                      "_system_config": HEALTH})
    for _ in range(2):
        c.add_node(**NODE)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        if was_local:
            from lf_services import init_local_ray

            init_local_ray()


def actors_by_node(match) -> Counter:
    # The GCS actor table of the cluster this driver is connected to. (ray.util.state needs a dashboard and,
    # without an address, picks whichever Ray instance on the machine started last.)
    from ray._private.state import actors

    return Counter(a["Address"]["NodeID"] for a in actors(actor_state_name="ALIVE").values()
                   if match(a["ActorClassName"]))


class NodeKiller(threading.Thread):
    """Waits until `ready()` and some worker node hosts actors that `match`, then removes that node (no grace:
    its processes die at once, like a lost machine). Nodes are added back from the main thread (restore_nodes):
    starting a node installs signal handlers, which only the main thread may do."""

    def __init__(self, c, ready, match):
        super().__init__(daemon=True)
        self.c, self.ready, self.match = c, ready, match
        self.removed: dict | None = None
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            self._watch()
        except BaseException as e:  # surfaced by the test, not lost in a thread
            self.error = e

    def _watch(self) -> None:
        while not self.stop.wait(0.2):
            if not self.ready():
                continue
            hosts = actors_by_node(self.match)
            victims = [n for n in self.c.worker_nodes if hosts[n.node_id]]  # removed nodes leave this set
            if not victims:
                continue
            victim = max(victims, key=lambda n: hosts[n.node_id])
            self.removed = {"node_id": victim.node_id, "actors": hosts[victim.node_id]}
            self.c.remove_node(victim, allow_graceful=False)
            return


def restore_nodes(c) -> None:
    while len(c.worker_nodes) < 2:
        c.add_node(**NODE)
    c.wait_for_nodes()


def tar_keys(shard_dir: Path) -> list[str]:
    keys = []
    for tar in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(tar) as t:
            keys += sorted({m.name.split(".", 1)[0] for m in t.getmembers()})
    return keys


def assert_exactly_once(dataset: Path, corpus: Path, samples_per_shard: int) -> tuple[int, int]:
    """No input lost or duplicated: inputs = kept + rejected, ids unique, tars hold exactly the kept ids."""
    ds = mf.Dataset(dataset)
    kept, rejects = ds.manifest().to_pylist(), ds.rejects().to_pylist()
    ids = [r["id"] for r in kept + rejects]
    assert len(ids) == len(set(ids)), [i for i, n in Counter(ids).items() if n > 1]
    inputs = {r["id"] for r in discover(corpus, samples_per_shard)}
    assert {r["source_id"] for r in kept + rejects} == inputs
    keys = tar_keys(dataset / mf.SHARDS)
    assert len(keys) == len(set(keys)) and set(keys) == {r["id"] for r in kept}
    report = verify_dataset(dataset, decode=True)
    assert report.ok, report.problems
    return len(kept), len(rejects)


# `workers` (the stage actors write the tars) is heavy: .ci/run keeps `auto`, and test_shard_writes checks that both
# modes write the same dataset.
@pytest.mark.parametrize("writes", ["auto", pytest.param("workers", marks=pytest.mark.heavy)])
def test_a_worker_node_lost_mid_curation_costs_no_sample(cluster, tmp_path, writes):
    """`auto` with a local output path: the driver writes the shards. `workers` (a path every node mounts, as
    here): the stage actors write them, so the lost node may take a half-written group."""
    corpus = tmp_path / "corpus"
    generate_demo_corpus(corpus, DemoCorpusSpec(num_images=10, num_videos=3, num_audio=3, seed=21))
    cfg = CurationConfig(input_dir=corpus, samples_per_shard=4, shard_writes=writes)
    names = tuple(s.__name__ for s in STAGES)
    # The main pipeline's stage actors (after the scan and the driver-side dedup) are up: kill their node.
    killer = NodeKiller(cluster, ready=lambda: True, match=lambda cls: any(n in cls for n in names))
    killer.start()
    try:
        result = run_curation(cfg, tmp_path / "ds")
    finally:
        killer.stop.set()
        killer.join(timeout=60)
        restore_nodes(cluster)
    assert killer.error is None and killer.removed, killer.error or "the job ended before a node could be removed"
    kept, rejected = assert_exactly_once(tmp_path / "ds", corpus, cfg.samples_per_shard)
    assert result.kept == kept and result.rejected + result.filtered == rejected and kept >= 10
    groups = -(-result.inputs // cfg.samples_per_shard)
    assert result.groups_written == ({"workers": groups, "driver": 0} if writes == "workers"
                                     else {"workers": 0, "driver": groups})


@pytest.mark.heavy  # parts: test_resume (a worker failure healed, a rerun resuming from its checkpoint, one node)
def test_training_survives_a_lost_node_and_resumes_from_its_checkpoint(cluster, tmp_path):
    import ray.cloudpickle
    from test_resume import plan, write_dataset

    from latentforge.training.trainer import fit_stage

    data = tmp_path / "data"
    write_dataset(data)
    log = tmp_path / "steps.jsonl"
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # StepLog travels to the train workers
    p = plan(2, steps=30, checkpoint_every=5, log_every=1, val_every=100)
    # After two checkpoints (5, 10): Ray Train registers a reported checkpoint asynchronously, so a node lost just
    # after the first report could restart the group from scratch, which is not what this test is about.
    killer = NodeKiller(cluster, ready=lambda: max(logged_steps(log), default=0) >= 12,
                        match=lambda cls: "RayTrainWorker" in cls)
    killer.start()
    try:
        result = fit_stage(p, p.stages[0], [data], tmp_path / "runs", "lost-node", sink=StepLog(str(log)))
    finally:
        killer.stop.set()
        killer.join(timeout=60)
        restore_nodes(cluster)
    assert killer.error is None and killer.removed, killer.error or "the stage ended before a node could be removed"
    state = json.loads((result.checkpoint_dir / "state.json").read_text())
    assert state["step"] == 30
    attempts: dict[int, list[int]] = {}
    for entry in read_log(log):
        attempts.setdefault(entry["pid"], []).append(entry["step"])
    first, *restarts = attempts.values()  # dict order: the order the rank-0 processes first logged
    assert restarts, "the worker group was not restarted"
    resumed_at = restarts[-1][0]
    assert resumed_at > 1 and (resumed_at - 1) % 5 == 0  # the step after a checkpoint, not step 1
    assert resumed_at - 1 <= max(first) and restarts[-1][-1] == 30


class StepLog:
    """A MetricSink that appends (pid, step) per logged step to a file every node can reach."""

    def __init__(self, path: str):
        self.path = path

    def start(self) -> None:
        pass

    def log_metrics(self, metrics: dict, step: int) -> None:
        if "loss" in metrics:
            with open(self.path, "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "step": int(step)}) + "\n")

    def log_artifact(self, path, artifact_path=None) -> None:
        pass

    def close(self, timeout_s: float = 30.0) -> bool:
        return True


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def logged_steps(path: Path) -> list[int]:
    return [e["step"] for e in read_log(path)]


def latentforge(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "latentforge"), *args]


# `workers` (the stage actors write the tars) is heavy: .ci/run keeps `auto`, and test_shard_writes checks that both
# modes write the same dataset.
@pytest.mark.parametrize("writes", ["auto", pytest.param("workers", marks=pytest.mark.heavy)])
def test_a_killed_curation_driver_reruns_to_an_exactly_once_dataset(cluster, tmp_path, repo_root, writes):
    """With `workers`, the stage actors may die (with the driver's job) between a group's tars and its marker."""
    corpus, work = tmp_path / "corpus", tmp_path / "work"
    generate_demo_corpus(corpus, DemoCorpusSpec(num_images=10, num_videos=2, num_audio=2, seed=22))
    args = latentforge("curate", str(repo_root / "configs" / "quickstart.yaml"), "--address", cluster.address,
                       "--set", f"workdir={work}", "--set", f"curation.input_dir={corpus}",
                       "--set", "curation.samples_per_shard=2", "--set", "curation.generate_demo_corpus=false",
                       "--set", f"curation.shard_writes={writes}")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    done_dir = work / "datasets" / "demo" / mf.SHARDS / DONE_DIR
    log = open(tmp_path / "first.log", "wb")
    first = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        while first.poll() is None and not list(done_dir.glob("group-*.json")):
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)  # the driver only: the cluster lives on
        first.wait(timeout=60)
    finally:
        log.close()
    groups = len({r["shard"] for r in discover(corpus, 2)})
    done_at_kill = len(list(done_dir.glob("group-*.json")))
    assert first.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    assert 1 <= done_at_kill <= groups

    rerun = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    assert "resuming:" in rerun.stderr + rerun.stdout
    assert len(list(done_dir.glob("group-*.json"))) == groups
    assert_exactly_once(work / "datasets" / "demo", corpus, 2)


@pytest.mark.heavy  # the quickstart (test_quickstart) composed with --address on a cluster (the tests above)
def test_the_quickstart_runs_on_three_nodes_through_address(cluster, tmp_path, repo_root):
    import ray

    corpus, work = tmp_path / "corpus", tmp_path / "work"
    generate_demo_corpus(corpus, DemoCorpusSpec(num_images=8, num_videos=3, num_audio=3, seed=23))
    shrink = ["curation.samples_per_shard=8", "curation.generate_demo_corpus=false"]
    for i, steps in enumerate((6, 3, 3)):
        shrink += [f"training.stages.{i}.steps={steps}", f"training.stages.{i}.checkpoint_every={steps}",
                   f"training.stages.{i}.log_every=3"]
    shrink += ["training.stages.0.val_every=3", "training.stages.2.num_samples=1"]
    sets = [a for kv in shrink + [f"workdir={work}", f"curation.input_dir={corpus}"] for a in ("--set", kv)]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    done = subprocess.run(latentforge("run", str(repo_root / "configs" / "quickstart.yaml"), "--address",
                                      cluster.address, *sets), env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert f"Ray: {cluster.address}" in done.stdout and "(8 CPUs)" in done.stdout  # the cluster, not a new Ray
    assert len([n for n in ray.nodes() if n["Alive"]]) == 3
    dataset = work / "datasets" / "demo"
    assert verify_dataset(dataset, decode=False).ok
    for stage in ("image_pretrain", "video_pretrain", "finetune"):
        assert f"checkpoint ({stage})" in done.stdout
    # What the user reads: each step line once (Ray Train's print patch doubled them), and no warning a second
    # from a placement-group cleaner asking a State API this cluster does not serve (no dashboard).
    steps = [line for line in done.stdout.splitlines() if "] step " in line and "samples/s" in line]
    assert len(steps) == 4 and len(set(steps)) == 4, steps  # image_pretrain steps 3 and 6, then 3 for each stage
    assert "PlacementGroupCleaner" not in done.stdout + done.stderr
