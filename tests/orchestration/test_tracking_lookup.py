"""Which MLflow store and which run a `latentforge` invocation writes to, against real SQLite MLflow stores (and
one real `mlflow server`): relative tracking URIs, the curation run of a changed curation config, dataset
digests of long names, quotes in tag values, a plan named like one of its children, a server that is down when
the tracker starts, the UI hint, and `select --modality` with a misspelt modality. Curation itself is faked
(a tiny dataset written directly); the MLflow side and the orchestration code are the real ones."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from latentforge.datasets import manifest as mf
from latentforge.datasets.shards import LatentSample, LatentShardWriter, sha256_file
from latentforge.orchestration.config import LatentforgeConfig, resolve_paths
from latentforge.orchestration.tracking import Tracker, resolve_tracking_uri


@pytest.fixture(autouse=True)
def no_tracking_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def write_dataset(root: Path, name: str, dataset_id: str) -> Path:
    """A one-shard curated dataset, as curation leaves it (card, manifest, rejects, shard)."""
    rng = np.random.default_rng(0)
    shard = "shard-000000-00.tar"
    rows = []
    with LatentShardWriter(root / mf.SHARDS / shard) as w:
        for i in range(2):
            key, modality = f"s{i}", "image" if i % 2 else "video"
            w.write_sample(LatentSample(key, rng.normal(size=(12, 1, 4, 4)).astype(np.float32),
                                        np.zeros((8, 16), np.float32), np.ones(8, bool), "c", {"modality": modality}))
            rows.append({"id": key, "source_id": key, "modality": modality, "latent_shape": [12, 1, 4, 4],
                         "caption": "c", "shard": shard, "status": "ok", "bucket": "1x8x8"})
    mf.write_table(mf.to_table(rows, mf.MANIFEST_SCHEMA), root / mf.MANIFEST)
    mf.write_table(mf.to_table([], mf.REJECTS_SCHEMA), root / mf.REJECTS)
    card = {"id": dataset_id, "name": name, "num_samples": 2, "modalities": {"image": 1, "video": 1},
            "shards": [{"name": shard, "sha256": sha256_file(root / mf.SHARDS / shard), "count": 2}],
            "encoders": {"text": {"dim": 16, "max_len": 8}}, "latent_stats": {}}
    (root / mf.CARD).write_text(json.dumps(card))
    return root


@pytest.fixture
def fake_curation(monkeypatch):
    """`run_curation` writes a tiny dataset whose id follows the config (as the real one's does); `fail` makes
    the next call raise, as an interrupted job would."""
    import latentforge.orchestration.run as run_mod
    import latentforge.pipelines.curate as curate_mod
    import latentforge.pipelines.report as report_mod
    from latentforge.pipelines.card import dataset_id

    state = {"fail": False, "calls": 0}

    def run_curation(cur, out, rows=None):
        state["calls"] += 1
        state["rows"] = rows
        if state["fail"]:
            state["fail"] = False
            raise RuntimeError("interrupted")
        card = json.loads((write_dataset(Path(out), cur.name, dataset_id(cur, [])) / mf.CARD).read_text())
        return curate_mod.CurationResult(dataset_dir=Path(out), inputs=2, kept=2, rejected=0, filtered=0, reasons={},
                                         by_modality={"image": 1, "video": 1}, card=card, samples=2)

    def write_report(dataset_dir, out=None):
        path = Path(dataset_dir) / "report.html"
        path.write_text("<html></html>")
        return path

    monkeypatch.setattr(curate_mod, "run_curation", run_curation)
    monkeypatch.setattr(report_mod, "write_report", write_report)
    monkeypatch.setattr(run_mod, "log_tables", lambda *a, **k: None)
    return state


def config(root: Path, name: str = "plan", workdir: str = "work", uri: str | None = None,
           **curation) -> LatentforgeConfig:
    (root / "corpus").mkdir(parents=True, exist_ok=True)
    cfg = LatentforgeConfig.model_validate({
        "name": name, "workdir": str(root / workdir), "tracking": {"uri": uri, "system_metrics": False},
        "curation": {"name": "demo", "input_dir": str(root / "corpus"), "image_size": 32, **curation}})
    return resolve_paths(cfg, root)


def all_runs(cfg: LatentforgeConfig):
    client = MlflowClient(resolve_tracking_uri(cfg.tracking.uri, cfg.workdir))
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    return client, client.search_runs([experiment.experiment_id], order_by=["start_time ASC"])


# --- 1. relative tracking URIs --------------------------------------------------------------------------------

@pytest.mark.parametrize("uri, expected", [
    ("sqlite:///mlflow.db", "sqlite:///{cwd}/mlflow.db"),
    ("sqlite:///sub/mlflow.db?timeout=20", "sqlite:///{cwd}/sub/mlflow.db?timeout=20"),
    ("file:./mlruns", "file://{cwd}/mlruns"),
    ("mlruns", "{cwd}/mlruns"),
    ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("postgresql://user@db/mlflow", "postgresql://user@db/mlflow"),
])
def test_a_relative_tracking_uri_is_made_absolute_against_the_invoking_directory(tmp_path, monkeypatch, uri,
                                                                                  expected):
    monkeypatch.chdir(tmp_path)
    cwd = str(tmp_path.resolve())
    assert resolve_tracking_uri(uri, tmp_path / "work") == expected.format(cwd=cwd)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the environment's URI too
    assert resolve_tracking_uri(None, tmp_path / "work") == expected.format(cwd=cwd)


WORKER = """
import pickle, sys
sink = pickle.loads(open(sys.argv[1], "rb").read())
for step in range(3):
    sink.log_metrics({"loss": 1.0 / (step + 1)}, step)
assert sink.close(timeout_s=30)
"""


def test_a_worker_in_another_directory_logs_to_the_store_of_a_relative_sqlite_uri(tmp_path, monkeypatch):
    """A Ray Train worker unpickles its RunSink in a trial directory of its own (a process of its own, here too:
    MLflow caches stores per URI within a process): with the URI left relative it opened a fresh empty store
    there and every metric was dropped ("Run ... not found")."""
    invoked, trial = tmp_path / "invoked", tmp_path / "trial"
    invoked.mkdir()
    trial.mkdir()
    monkeypatch.chdir(invoked)
    tracker = Tracker(resolve_tracking_uri("sqlite:///mlflow.db", invoked / "work"), "relative")
    run_id = tracker.start_run("train-s")
    (tmp_path / "sink.pkl").write_bytes(pickle.dumps(tracker.sink(run_id)))

    done = subprocess.run([sys.executable, "-c", WORKER, str(tmp_path / "sink.pkl")], cwd=trial,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (trial / "mlflow.db").exists()
    client = MlflowClient(f"sqlite:///{invoked / 'mlflow.db'}")
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [0, 1, 2]


def test_a_tracker_given_a_relative_uri_hands_workers_an_absolute_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tracker = Tracker("sqlite:///rel.db", "relative")
    sink = pickle.loads(pickle.dumps(tracker.sink(tracker.start_run("r"))))
    assert sink.uri == tracker.uri == f"sqlite:///{tmp_path.resolve() / 'rel.db'}"


# --- 2. the curation run belongs to its curation config -------------------------------------------------------

def test_a_changed_curation_gets_a_run_of_its_own_and_an_unchanged_resume_reopens_its_run(tmp_path, fake_curation):
    from latentforge.orchestration.run import run_all

    first = run_all(config(tmp_path, image_size=32), do_train=False)
    changed = run_all(config(tmp_path, image_size=64), do_train=False)
    assert changed.parent_run_id == first.parent_run_id and changed.curation_run_id != first.curation_run_id

    client, runs = all_runs(config(tmp_path))
    curation = {r.info.run_id: r for r in runs if r.data.tags.get("latentforge.kind") == "curation"}
    assert set(curation) == {first.curation_run_id, changed.curation_run_id}
    for run_id, size in ((first.curation_run_id, "32"), (changed.curation_run_id, "64")):
        run = client.get_run(run_id)
        assert run.data.params["image_size"] == size  # the old run's params were not overwritten or refused
        assert len(run.inputs.dataset_inputs) == 1  # one dataset each: the one it wrote
        card = json.loads(Path(client.download_artifacts(run_id, "dataset/card.json", str(tmp_path / run_id)))
                          .read_text())
        assert json.loads(run.inputs.dataset_inputs[0].dataset.profile)["dataset_id"] == card["id"]
    assert curation[first.curation_run_id].data.tags["latentforge.curation_key"] != \
        curation[changed.curation_run_id].data.tags["latentforge.curation_key"]

    # an interrupted curation, then a rerun of the same config: one run, reopened
    fake_curation["fail"] = True
    with pytest.raises(RuntimeError):
        run_all(config(tmp_path, image_size=16), do_train=False)
    resumed = run_all(config(tmp_path, image_size=16), do_train=False)
    _, runs = all_runs(config(tmp_path))
    assert [r.info.run_id for r in runs if r.data.params.get("image_size") == "16"] == [resumed.curation_run_id]
    assert client.get_run(resumed.curation_run_id).info.status == "FINISHED"
    # and a rerun with nothing left to do points at that same run
    assert run_all(config(tmp_path, image_size=16), do_train=False).curation_run_id == resumed.curation_run_id


def test_inputs_changed_after_a_finished_curation_are_curated_again_in_a_run_of_their_own(tmp_path, fake_curation):
    """A finished curation was skipped whatever happened to its inputs since: files added to the corpus, or a
    caption fixed, never reached the dataset. Its marker now records the inputs it read (paths, sizes, times);
    inputs that cannot be listed any more (archived after curation) leave the finished dataset in use."""
    import os
    import shutil

    from latentforge.orchestration.run import run_all

    cfg = config(tmp_path)
    corpus = tmp_path / "corpus"
    (corpus / "a.png").write_bytes(b"a")  # the fake curation reads nothing; discovery lists and stats them
    first = run_all(cfg, do_train=False)
    assert run_all(cfg, do_train=False).curation_run_id == first.curation_run_id and fake_curation["calls"] == 1

    (corpus / "b.png").write_bytes(b"b")  # added
    added = run_all(cfg, do_train=False)
    assert fake_curation["calls"] == 2 and added.curation_run_id != first.curation_run_id
    (corpus / "b.txt").write_text("a caption")  # b's sidecar caption: b changed
    captioned = run_all(cfg, do_train=False)
    assert fake_curation["calls"] == 3 and captioned.curation_run_id not in (first.curation_run_id,
                                                                               added.curation_run_id)
    stat = (corpus / "a.png").stat()
    (corpus / "a.png").write_bytes(b"A")  # rewritten in place, same size
    os.utime(corpus / "a.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    rewritten = run_all(cfg, do_train=False)
    assert rewritten.curation_run_id != captioned.curation_run_id and fake_curation["calls"] == 4

    shutil.rmtree(corpus)  # archived: the dataset curated last is used as it is
    latest = run_all(cfg, do_train=False)
    assert fake_curation["calls"] == 4
    _, runs = all_runs(cfg)
    digests = [r.data.tags.get("latentforge.inputs_digest") for r in runs if r.data.tags.get("latentforge.kind") ==
               "curation"]
    assert len(digests) == 4 == len(set(digests))  # one curation run per state of the inputs
    assert latest.curation_run_id == rewritten.curation_run_id  # the run that wrote the dataset in use


def test_the_inputs_are_listed_once_for_the_digest_and_the_job(tmp_path, fake_curation, monkeypatch):
    """The orchestrator lists the inputs for their digest and hands the same rows to the job, which listed them
    again (a minute or more at millions of objects on s3); the digest recorded is of what the job was given."""
    import latentforge.pipelines.discover as discover_mod
    from latentforge.orchestration.run import STATE_DIR, run_all

    cfg = config(tmp_path)
    for name in ("a.png", "b.png"):
        (tmp_path / "corpus" / name).write_bytes(name.encode())
    listings = []
    real = discover_mod.discover_table
    monkeypatch.setattr(discover_mod, "discover_table", lambda *a, **k: listings.append(a) or real(*a, **k))
    run_all(cfg, do_train=False)
    assert len(listings) == 1 and fake_curation["calls"] == 1
    assert fake_curation["rows"]["relpath"].to_pylist() == ["a.png", "b.png"]  # discover_table's table
    marker = json.loads((cfg.workdir / STATE_DIR / "curation-demo.json").read_text())
    assert marker["inputs_digest"] == discover_mod.inputs_digest(fake_curation["rows"])


# --- 3. dataset digests ---------------------------------------------------------------------------------------

def test_versions_of_a_dataset_with_a_long_name_keep_digests_of_their_own(tmp_path):
    name = "webvid-laion-aesthetic-6plus-clips-2024"  # 39 characters: [:36] cut the id's hash off
    ids = [f"{name}-{h}" for h in ("0123456789ab", "ba9876543210")]
    dirs = [write_dataset(tmp_path / f"v{n}", name, dataset_id) for n, dataset_id in enumerate(ids)]
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "digests")
    run_id = tracker.start_run("train-s")
    for d in dirs:
        tracker.log_dataset(run_id, d, "training")
    assert tracker.close(timeout_s=30)

    inputs = tracker.client.get_run(run_id).inputs.dataset_inputs
    assert sorted(json.loads(i.dataset.profile)["dataset_id"] for i in inputs) == ids  # both, full ids
    digests = {i.dataset.digest for i in inputs}
    assert len(digests) == 2 and all(len(d) == 36 for d in digests)
    assert digests == {hashlib.sha256(i.encode()).hexdigest()[:36] for i in ids}


# --- 4. quotes in names and tag values ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared_tracker(tmp_path_factory):
    return Tracker(f"sqlite:///{tmp_path_factory.mktemp('quotes') / 'mlflow.db'}", "quotes")


@pytest.mark.parametrize("value", ["bob's runs", 'say "hi"', "both ' and \"", "back\\slash", "trailing\\"])
def test_runs_are_found_again_whatever_their_tag_values_hold(shared_tracker, value):
    tracker = shared_tracker
    other = tracker.start_run(f"plan {value}", tags={"latentforge.workdir": value + "-other"})
    first, resumed = tracker.resume_or_start(f"plan {value}", match={"latentforge.workdir": value}, wait_s=0)
    assert not resumed and first != other
    again, resumed = tracker.resume_or_start(f"plan {value}", match={"latentforge.workdir": value}, wait_s=0)
    assert resumed and again == first
    assert tracker.find_run(f"plan {value}", tags={"latentforge.workdir": value + "x"}) is None


def test_a_workdir_with_a_quote_in_its_name_runs_and_resumes(tmp_path, fake_curation):
    from latentforge.orchestration.run import run_all

    first = run_all(config(tmp_path, workdir="bob's runs"), do_train=False)
    again = run_all(config(tmp_path, workdir="bob's runs"), do_train=False)
    assert (again.parent_run_id, again.curation_run_id) == (first.parent_run_id, first.curation_run_id)


# --- 5. the plan run is a plan run ----------------------------------------------------------------------------

def test_a_plan_named_like_its_curation_run_reopens_itself_not_its_child(tmp_path, fake_curation):
    from latentforge.orchestration.run import run_all

    first = run_all(config(tmp_path, name="curate-demo"), do_train=False)
    again = run_all(config(tmp_path, name="curate-demo"), do_train=False)
    assert again.parent_run_id == first.parent_run_id != first.curation_run_id
    _, runs = all_runs(config(tmp_path))
    assert len(runs) == 2
    plan = next(r for r in runs if r.info.run_id == first.parent_run_id)
    assert plan.data.tags["latentforge.kind"] == "plan" and "mlflow.parentRunId" not in plan.data.tags


# --- 7. the UI hint names the store actually used -------------------------------------------------------------

def summary_text(cfg: LatentforgeConfig, monkeypatch) -> str:
    from rich.console import Console

    from latentforge.orchestration import cli
    from latentforge.orchestration.run import RunSummary

    console = Console(width=400, record=True, file=open(os.devnull, "w"))
    monkeypatch.setattr(cli, "console", console)
    cli._print_summary(cfg, RunSummary(parent_run_id="p", experiment_id="7"))
    return console.export_text()


def test_the_ui_hint_follows_the_tracking_uri(tmp_path, monkeypatch):
    text = summary_text(config(tmp_path), monkeypatch)
    assert f"latentforge ui --workdir {tmp_path / 'work'}, then browse http://127.0.0.1:5000/#/experiments/7/runs" \
        in text

    text = summary_text(config(tmp_path, uri="http://mlflow.internal:8080/"), monkeypatch)
    assert "browse http://mlflow.internal:8080/#/experiments/7/runs" in text and "latentforge ui" not in text

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'shared.db'}")
    text = summary_text(config(tmp_path), monkeypatch)
    assert f"--backend-store-uri sqlite:///{tmp_path / 'shared.db'}" in text

    monkeypatch.chdir(tmp_path)
    text = summary_text(config(tmp_path, uri="file:./mlruns"), monkeypatch)
    assert f"mlflow ui --backend-store-uri file://{tmp_path.resolve() / 'mlruns'}" in text


# --- 8. select with an unknown modality -----------------------------------------------------------------------

def test_select_names_an_unknown_modality_and_the_valid_ones(tmp_path):
    from typer.testing import CliRunner

    from latentforge.orchestration.cli import app

    parent = write_dataset(tmp_path / "parent", "demo", "demo-0123456789ab")
    result = CliRunner().invoke(app, ["select", str(parent), "--out", str(tmp_path / "child"),
                                      "--modality", "imagee"], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    out = " ".join(result.output.split())
    assert "'imagee'" in out and "image, video, audio" in out and "None" not in out
    result = CliRunner().invoke(app, ["select", str(parent), "--out", str(tmp_path / "child"),
                                      "--modality", "audio"], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "modality audio matches no sample" in " ".join(result.output.split())


# --- 7. a resumed run whose params changed ----------------------------------------------------------------------

def test_params_changed_on_resume_are_kept_as_tags_and_an_artifact_not_dropped(tmp_path, caplog):
    """MLflow params are immutable: a resume with other execution settings (resources, a checkpoint URI) had its
    new values refused and dropped, so the run kept describing the first invocation with no trace of the second."""
    uri, artifacts = f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts")
    first = Tracker(uri, "resume-params", artifacts)
    run_id, resumed = first.resume_or_start("train-s", match={"latentforge.stage_key": "k"}, wait_s=0)
    first.log_params(run_id, {"stage": {"steps": 4, "resources": {"num_cpus": 1}}, "seed": 0})
    assert not resumed and first.close(timeout_s=30)

    second = Tracker(uri, "resume-params", artifacts)
    again, resumed = second.resume_or_start("train-s", match={"latentforge.stage_key": "k"}, wait_s=0)
    assert resumed and again == run_id
    caplog.set_level("WARNING", logger="latentforge")
    second.log_params(run_id, {"stage": {"steps": 4, "resources": {"num_cpus": 2}}, "seed": 0, "added": "x"})
    assert second.close(timeout_s=30)

    run = second.client.get_run(run_id)
    assert run.data.params == {"stage.steps": "4", "stage.resources.num_cpus": "1", "seed": "0", "added": "x"}
    assert run.data.tags["latentforge.param_now.stage.resources.num_cpus"] == "2"
    assert not any(k.startswith("latentforge.param_now.") and k != "latentforge.param_now.stage.resources.num_cpus"
                   for k in run.data.tags)
    [artifact] = second.client.list_artifacts(run_id, "invocations")
    record = json.loads(Path(second.client.download_artifacts(run_id, artifact.path, str(tmp_path))).read_text())
    assert record == {"changed_params": {"stage.resources.num_cpus": {"first": "1", "now": "2"}}}
    assert "1 param(s) differ" in caplog.text and "refused" not in caplog.text
