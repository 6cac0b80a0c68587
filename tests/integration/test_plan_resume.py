"""`latentforge run` on an existing workdir resumes the whole plan, tracked by a real `mlflow server`:
a plan stopped in its second training stage is rerun; curation is not redone, the finished stage is not
retrained, the interrupted stage resumes from its checkpoint, and MLflow holds one parent run with one child
per job/stage. The same runs carry dataset inputs (mlflow.data), git commit + config hash tags and system metrics.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from lf_plan_runs import assert_commit_and_config_hash, assert_system_metrics, dataset_inputs, parents_and_children

from latentforge.orchestration.config import LatentforgeConfig, resolve_paths
from latentforge.orchestration.run import run_all

# heavy: test_quickstart stops and reruns the quickstart's plan the same way (one parent, curation and finished
# stages not redone, the stage resumed, tags, lineage, system metrics); this module adds a resumed stage's weights
# against an uninterrupted plan's and a changed stage's runs, each one more stage run.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.heavy]

STAGE = {"modalities": ["image", "video"], "video_frames_as_images": True, "steps": 4, "batch_size": 4,
         "checkpoint_every": 2, "log_every": 1, "val_fraction": 0.2, "val_every": 4, "num_samples": 0}


def plan_config(root: Path, corpus: Path, uri: str) -> LatentforgeConfig:
    cfg = LatentforgeConfig.model_validate({
        "name": "resumable", "workdir": str(root / "work"),
        "tracking": {"uri": uri, "experiment": "plan-resume-test", "system_metrics_interval_s": 1.0},
        "curation": {"name": "tiny", "input_dir": str(corpus), "image_size": 32, "video_frames": 4,
                     "samples_per_shard": 4, "clips": {"enabled": False}},
        "training": {"model": {"preset": "DiT-T", "overrides": {"hidden": 64, "depth": 2, "mixer_depth": 1}},
                     "num_workers": 1, "max_failures": 0,
                     "stages": [{"name": "first", **STAGE},
                                # no retries: the plan stops here, after the step-2 checkpoint
                                {"name": "second", **STAGE, "fail_at_step": 3}]}})
    return resolve_paths(cfg, root)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, mlflow_server, ray_local):
    from latentforge.datasets.demo_corpus import DemoCorpusSpec, generate_demo_corpus

    root = tmp_path_factory.mktemp("plan")
    corpus = root / "corpus"
    generate_demo_corpus(corpus, DemoCorpusSpec(num_images=8, num_videos=3, num_audio=0, include_broken=False,
                                                 seed=4))
    cfg = plan_config(root, corpus, mlflow_server)
    with pytest.raises(Exception, match="injected failure"):
        run_all(cfg)
    work = cfg.workdir
    shards = sorted((work / "datasets" / "tiny" / "shards").glob("*.tar"))
    before = {p: p.stat().st_mtime_ns for p in shards + [work / "exports" / "first" / "model.safetensors"]}
    assert shards and (work / "state" / "stage-first.json").exists()
    assert not (work / "state" / "stage-second.json").exists()
    summary = run_all(cfg)
    return cfg, summary, before


def client_for(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def test_one_parent_and_one_child_per_job_and_stage(resumed, mlflow_server):
    cfg, summary, _ = resumed
    client = client_for(mlflow_server)
    parents, children, statuses = parents_and_children(client, summary)
    assert parents == [summary.parent_run_id] and statuses == {"FINISHED"}
    assert children == ["curate-tiny", "train-first", "train-second"]


def test_curation_and_the_finished_stage_are_not_redone(resumed, mlflow_server):
    cfg, summary, before = resumed
    assert {p: p.stat().st_mtime_ns for p in before} == before
    client = client_for(mlflow_server)
    first = [m.step for m in client.get_metric_history(summary.stage_runs["first"], "loss")]
    assert sorted(first) == [1, 2, 3, 4]  # trained once


def test_the_interrupted_stage_resumed_from_its_checkpoint(resumed, mlflow_server):
    cfg, summary, _ = resumed
    state = json.loads((summary.checkpoints["second"] / "state.json").read_text())
    assert state["step"] == 4
    client = client_for(mlflow_server)
    second = sorted(m.step for m in client.get_metric_history(summary.stage_runs["second"], "loss"))
    assert second == [1, 2, 3, 4]  # steps 1-2 before the failure, 3-4 after resuming from the step-2 checkpoint
    assert summary.registered and summary.registered[0] == "resumable"


def test_every_run_has_git_commit_and_config_hash(resumed, mlflow_server):
    cfg, summary, _ = resumed
    client = client_for(mlflow_server)
    assert_commit_and_config_hash(client, [summary.parent_run_id, summary.curation_run_id,
                                           *summary.stage_runs.values()], cfg.config_hash())


def test_dataset_lineage_as_run_inputs(resumed, mlflow_server):
    cfg, summary, _ = resumed
    client = client_for(mlflow_server)
    card = json.loads((cfg.curation.output_dir / "card.json").read_text())
    manifest = str((cfg.curation.output_dir / "manifest.parquet").resolve())
    out = dataset_inputs(client, summary.curation_run_id)["curation_output"]
    assert out.digest == card["id"] and json.loads(out.source)["uri"] == manifest
    for run_id in summary.stage_runs.values():
        got = dataset_inputs(client, run_id)
        assert set(got) == {"training", "validation"}
        assert all(d.digest == card["id"] and json.loads(d.source)["uri"] == manifest for d in got.values())


def test_training_runs_have_system_metrics(resumed, mlflow_server):
    _, summary, _ = resumed
    client = client_for(mlflow_server)
    assert_system_metrics(client, list(summary.stage_runs.values()))


def test_the_resumed_stage_ends_with_the_weights_of_an_uninterrupted_one(resumed, tmp_path):
    import torch
    from safetensors.torch import load_file

    from latentforge.training.trainer import fit_stage

    cfg, summary, _ = resumed
    plan = cfg.training
    stage = plan.stages[1].model_copy(update={"fail_at_step": None})
    straight = fit_stage(plan, stage, list(plan.datasets), tmp_path, "straight", summary.checkpoints["first"])
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(straight.checkpoint_dir / name))
        b = load_file(str(summary.checkpoints["second"] / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_a_changed_stage_trains_from_its_start_in_runs_of_its_own(resumed, mlflow_server):
    """A new learning rate for the second stage: it trains again, all its steps, from the first stage's
    weights, in a new MLflow run and a new checkpoint directory; the first stage and the old runs stay as
    they were. (Under the stage's name alone Ray Train reloaded the finished run's last checkpoint: no step
    ran and the old weights were recorded under the new key.) Its own experiment, so the tests above keep
    theirs."""
    import torch
    from safetensors.torch import load_file

    cfg, summary, _ = resumed
    first, second = cfg.training.stages
    second = second.model_copy(update={"fail_at_step": None,
                                       "optim": second.optim.model_copy(update={"lr": second.optim.lr * 3})})
    again = run_all(cfg.model_copy(update={
        "tracking": cfg.tracking.model_copy(update={"experiment": "plan-resume-changed"}),
        "training": cfg.training.model_copy(update={"stages": [first, second]})}))

    assert again.stage_runs["first"] == summary.stage_runs["first"]  # not retrained
    assert again.stage_runs["second"] != summary.stage_runs["second"]
    assert again.checkpoints["second"] != summary.checkpoints["second"]
    assert json.loads((again.checkpoints["second"] / "state.json").read_text())["step"] == 4
    client = client_for(mlflow_server)
    new = sorted(m.step for m in client.get_metric_history(again.stage_runs["second"], "loss"))
    old = sorted(m.step for m in client.get_metric_history(summary.stage_runs["second"], "loss"))
    assert new == [1, 2, 3, 4] and old == [1, 2, 3, 4]
    assert float(client.get_run(again.stage_runs["second"]).data.params["stage.optim.lr"]) == second.optim.lr
    a = load_file(str(again.checkpoints["second"] / "model.safetensors"))
    b = load_file(str(summary.checkpoints["second"] / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    marker = json.loads((cfg.workdir / "state" / "stage-second.json").read_text())
    assert marker["run_id"] == again.stage_runs["second"]
