"""The quickstart, shrunk: demo corpus -> Ray Data curation -> 3 Ray Train stages, tracked by a real MLflow server.

The plan is stopped once in its last stage (a failure injected after that stage's first checkpoint, no retries)
and run again, as `latentforge run` on the same workdir: curation and the finished stages are not redone, the
interrupted stage resumes from its checkpoint, and MLflow holds one parent run with one child per job and stage.
(tests/integration/test_plan_resume.py checks the same on a smaller plan, and more, in the `heavy` runs.)"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.compute as pc
import pytest
from lf_plan_runs import assert_commit_and_config_hash, assert_system_metrics, dataset_inputs, parents_and_children

from latentforge.datasets.manifest import Dataset
from latentforge.orchestration.config import load_config, resolve_paths
from latentforge.orchestration.run import run_all

pytestmark = pytest.mark.integration

SHRINK = [
    "curation.samples_per_shard=16",
    "training.stages.0.steps=80", "training.stages.0.checkpoint_every=40", "training.stages.0.log_every=5",
    "training.stages.1.steps=20", "training.stages.1.checkpoint_every=20",
    "training.stages.2.steps=20", "training.stages.2.checkpoint_every=10", "training.stages.2.log_every=5",
    "training.stages.2.num_samples=4",
    # the first run stops at step 11 of the last stage, after its step-10 checkpoint; the rerun resumes there
    "training.stages.2.fail_at_step=11", "training.max_failures=0", "tracking.system_metrics_interval_s=1",
]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory, mlflow_server, ray_local):
    from latentforge.datasets.demo_corpus import DemoCorpusSpec, generate_demo_corpus

    root = tmp_path_factory.mktemp("qs")
    corpus = root / "corpus"
    index = generate_demo_corpus(corpus, DemoCorpusSpec(num_images=16, num_videos=8, num_audio=8, seed=3))
    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(repo / "configs" / "quickstart.yaml",
                      SHRINK + [f"workdir={root / 'work'}", f"curation.input_dir={corpus}",
                                f"tracking.uri={mlflow_server}", "tracking.experiment=quickstart-test"])
    cfg = resolve_paths(cfg, root)
    with pytest.raises(Exception, match="injected failure"):
        run_all(cfg)
    work = cfg.workdir
    done = sorted((work / "datasets").glob("*/shards/*.tar")) + sorted(work.glob("exports/*/model.safetensors"))
    assert len(done) > 2 and not (work / "exports" / "finetune").exists()
    summary = run_all(cfg)
    return cfg, summary, index, corpus, {p: p.stat().st_mtime_ns for p in done}


def test_every_input_is_kept_or_rejected_with_a_reason(quickstart):
    cfg, summary, index, corpus, _ = quickstart
    ds = Dataset(summary.dataset_dirs[0])
    kept = set(ds.manifest()["relpath"].to_pylist())
    rejects = ds.rejects().to_pylist()
    rejected = {r["relpath"] for r in rejects}
    inputs = {p.relative_to(corpus).as_posix() for p in corpus.rglob("*") if p.is_file() and p.suffix != ".txt"}
    assert kept | rejected == inputs and not kept & rejected
    assert all(r["reason"] and r["stage"] and r["message"] for r in rejects)
    by_path = {r["relpath"]: r for r in rejects}
    for f in index["files"]:
        if f["expect"] != "kept":
            assert f["path"] in rejected, f
        elif f["path"] not in kept:  # the generator can draw the same picture twice: exact duplicates go
            r = by_path[f["path"]]
            assert r["reason"] == "duplicate_exact" and r["duplicate_of"], r
            original = ds.manifest().filter(pc.field("id") == r["duplicate_of"]).to_pylist()[0]["relpath"]
            assert (corpus / original).read_bytes() == (corpus / f["path"]).read_bytes()
    codec = by_path["broken/unknown_codec.mp4"]  # probes as a video, but no decoder knows its codec
    assert (codec["status"], codec["stage"], codec["reason"]) == ("rejected", "probe", "unsupported_codec")
    assert "no decoder" in codec["message"]
    assert len(ds.card["shards"]) >= 2 and sum(s["count"] for s in ds.card["shards"]) == len(kept)


def test_runs_metrics_and_artifacts_in_mlflow(quickstart, mlflow_server):
    from mlflow.tracking import MlflowClient

    _, summary, _, _, _ = quickstart
    client = MlflowClient(mlflow_server)
    parent = client.get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{summary.parent_run_id}'")
    names = {r.info.run_name for r in children}
    assert names == {"curate-demo", "train-image_pretrain", "train-video_pretrain", "train-finetune"}
    curation = client.get_run(summary.curation_run_id)
    assert curation.data.metrics["samples"] == curation.data.metrics["kept"] + curation.data.metrics["rejected"] \
        + curation.data.metrics["filtered"]
    assert curation.data.metrics["reason_unsupported_codec"] == 1
    assert {"card.json", "manifest.parquet", "rejects.parquet", "rejects.csv", "report.html"} <= {
        Path(a.path).name for a in client.list_artifacts(summary.curation_run_id, "dataset")}
    for stage, run_id in summary.stage_runs.items():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert {"loss", "lr", "samples_per_s", "grad_norm"} <= set(run.data.metrics)
        # one loss per modality the stage's batches held (image_pretrain reads video frames as images)
        assert {m for m in run.data.metrics if m.startswith("loss/")} == {
            "image_pretrain": {"loss/image"}, "video_pretrain": {"loss/video"},
            "finetune": {"loss/image", "loss/video", "loss/audio"}}[stage]
        assert run.data.params["stage.name"] == stage
        model = {Path(a.path).name for a in client.list_artifacts(run_id, "model")}
        assert {"model.safetensors", "model_config.json", "dataset_card.json", "lineage.json"} <= model
        assert run.data.tags["latentforge.dataset_ids"].startswith("demo-")
        assert client.list_artifacts(run_id, "samples"), f"no samples logged for {stage}"
    image_samples = {Path(a.path).name for a in client.list_artifacts(summary.stage_runs["image_pretrain"], "samples")}
    assert "images.png" in image_samples
    video_samples = {Path(a.path).suffix for a in client.list_artifacts(summary.stage_runs["video_pretrain"], "samples")}
    assert ".gif" in video_samples
    finetune_samples = {Path(a.path).suffix for a in client.list_artifacts(summary.stage_runs["finetune"], "samples")}
    assert {".png", ".gif", ".wav"} <= finetune_samples  # one prompt per bucket: image, video and audio


def test_final_stage_is_registered_with_lineage(quickstart, mlflow_server):
    from mlflow.tracking import MlflowClient

    _, summary, _, _, _ = quickstart
    name, version = summary.registered
    mv = MlflowClient(mlflow_server).get_model_version(name, version)
    assert mv.run_id == summary.stage_runs["finetune"]
    assert mv.tags["latentforge.plan_run_id"] == summary.parent_run_id
    assert mv.tags["latentforge.dataset_ids"].startswith("demo-") and mv.tags["latentforge.stage"] == "finetune"


def test_validation_loss_on_held_out_samples(quickstart, mlflow_server):
    from mlflow.tracking import MlflowClient

    _, summary, _, _, _ = quickstart
    metrics = MlflowClient(mlflow_server).get_run(summary.stage_runs["image_pretrain"]).data.metrics
    assert {"val_loss", "val_loss_t0.1", "val_loss_t0.9"} <= set(metrics)
    per_t = [metrics[f"val_loss_t{t}"] for t in ("0.1", "0.3", "0.5", "0.7", "0.9")]
    assert all(0 < v < 10 for v in per_t) and metrics["val_loss"] == pytest.approx(sum(per_t) / 5, rel=1e-6)


def test_image_pretrain_loss_falls(quickstart, mlflow_server):
    from mlflow.tracking import MlflowClient

    _, summary, _, _, _ = quickstart
    history = MlflowClient(mlflow_server).get_metric_history(summary.stage_runs["image_pretrain"], "loss")
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(losses) >= 10
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < 0.6 * first, losses


def test_stages_chain_checkpoints_and_export_safetensors(quickstart, mlflow_server):
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    cfg, summary, _, _, _ = quickstart
    assert list(summary.exports) == ["image_pretrain", "video_pretrain", "finetune"]
    final = summary.exports["finetune"]
    weights = load_file(str(final / "model.safetensors"))
    config = json.loads((final / "model_config.json").read_text())
    assert config["visual_channels"] == 12 and any(k.startswith("visual.") for k in weights)
    state = json.loads((summary.checkpoints["finetune"] / "state.json").read_text())
    assert state["step"] == 20
    client = MlflowClient(mlflow_server)
    for stage, previous in (("video_pretrain", "image_pretrain"), ("finetune", "video_pretrain")):
        params = client.get_run(summary.stage_runs[stage]).data.params
        assert params["init_from"] == str(summary.checkpoints[previous])
    first = load_file(str(summary.exports["image_pretrain"] / "model.safetensors"))
    assert any((weights[k] - first[k]).abs().max() > 0 for k in first)


def test_the_registered_model_generates_from_a_new_prompt_and_its_lineage_verifies(quickstart, mlflow_server,
                                                                                   tmp_path):
    """`latentforge generate models:/NAME/VERSION`: the registered version's artifacts, fetched from the server,
    sampled with the finetune stage's own settings (its export records them) and decoded with the dataset's
    encoders."""
    from typer.testing import CliRunner

    from latentforge.orchestration.cli import app

    cfg, summary, _, _, _ = quickstart
    name, version = summary.registered
    sampling = json.loads((summary.exports["finetune"] / "sampling.json").read_text())
    stage = next(s for s in cfg.training.stages if s.name == "finetune")
    assert sampling["stage"]["sample_steps"] == stage.sample_steps and sampling["stage"]["name"] == "finetune"
    assert sampling["latent_stats"] == Dataset(summary.dataset_dirs[0]).card["latent_stats"]
    result = CliRunner().invoke(app, ["generate", f"models:/{name}/{version}", "--tracking-uri", mlflow_server,
                                      "-p", "a small red circle", "--modality", "video", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    from PIL import Image

    gif = Image.open(tmp_path / "00_video.gif")
    bucket = next(b for b in Dataset(summary.dataset_dirs[0]).card["buckets"] if not b.startswith("1x")
                  and "samples" not in b)
    assert gif.n_frames == int(bucket.split("x")[0])
    # and the shards it was trained on are all still there, as they were (`verify` on its lineage)
    verified = CliRunner().invoke(app, ["verify", f"models:/{name}/{version}", "--tracking-uri", mlflow_server])
    assert verified.exit_code == 0 and "(lineage of stage finetune): checked" in verified.output, verified.output


# ---- the plan stopped in its last stage and run again -------------------------------------------------------

def test_one_parent_and_one_child_per_job_and_stage_after_the_rerun(quickstart, mlflow_server):
    from mlflow.tracking import MlflowClient

    _, summary, _, _, _ = quickstart
    parents, children, statuses = parents_and_children(MlflowClient(mlflow_server), summary)
    assert parents == [summary.parent_run_id] and statuses == {"FINISHED"}
    assert children == ["curate-demo", "train-finetune", "train-image_pretrain", "train-video_pretrain"]


def test_curation_and_the_finished_stages_are_not_redone(quickstart, mlflow_server):
    from mlflow.tracking import MlflowClient

    _, summary, _, _, before = quickstart
    assert {p: p.stat().st_mtime_ns for p in before} == before  # shards and the two exports, as the first run left
    client = MlflowClient(mlflow_server)
    for stage, logged in (("image_pretrain", range(5, 81, 5)), ("video_pretrain", (10, 20))):
        steps = [m.step for m in client.get_metric_history(summary.stage_runs[stage], "loss")]
        assert sorted(steps) == list(logged), stage  # trained once


def test_the_interrupted_stage_resumed_from_its_checkpoint(quickstart, mlflow_server):
    from mlflow.tracking import MlflowClient

    _, summary, _, _, _ = quickstart
    steps = sorted(m.step for m in MlflowClient(mlflow_server).get_metric_history(summary.stage_runs["finetune"],
                                                                                  "loss"))
    assert steps == [5, 10, 15, 20]  # 5 and 10 before the failure at 11, 15 and 20 after resuming from step 10


def test_every_run_has_git_commit_config_hash_and_the_training_runs_system_metrics(quickstart, mlflow_server):
    from mlflow.tracking import MlflowClient

    cfg, summary, _, _, _ = quickstart
    client = MlflowClient(mlflow_server)
    assert_commit_and_config_hash(client, [summary.parent_run_id, summary.curation_run_id,
                                           *summary.stage_runs.values()], cfg.config_hash())
    assert_system_metrics(client, list(summary.stage_runs.values()))


def test_dataset_lineage_as_run_inputs(quickstart, mlflow_server):
    from mlflow.tracking import MlflowClient

    cfg, summary, _, _, _ = quickstart
    client = MlflowClient(mlflow_server)
    card = Dataset(summary.dataset_dirs[0]).card
    manifest = str((cfg.curation.output_dir / "manifest.parquet").resolve())
    out = dataset_inputs(client, summary.curation_run_id)["curation_output"]
    assert out.digest == card["id"] and json.loads(out.source)["uri"] == manifest
    assert "validation" in dataset_inputs(client, summary.stage_runs["image_pretrain"])  # the stage holding samples out
    for name, run_id in summary.stage_runs.items():
        got = dataset_inputs(client, run_id)
        assert "training" in got and set(got) <= {"training", "validation"}, (name, set(got))
        assert all(d.digest == card["id"] and json.loads(d.source)["uri"] == manifest for d in got.values()), name


def test_every_run_has_a_description_saying_what_it_did(quickstart, mlflow_server):
    """The run page's description (mlflow.note.content): counts, stages and where to look, for the MLflow reader."""
    from mlflow.tracking import MlflowClient

    cfg, summary, _, _, _ = quickstart
    client = MlflowClient(mlflow_server)
    note = {run_id: client.get_run(run_id).data.tags.get("mlflow.note.content", "")
            for run_id in [summary.parent_run_id, summary.curation_run_id, *summary.stage_runs.values()]}
    card = Dataset(summary.dataset_dirs[0]).card
    assert f"**Curated {card['num_samples']} of " in note[summary.curation_run_id]
    curation = note[summary.curation_run_id]
    assert f"dataset id `{card['id']}`" in curation and "report.html" in curation
    for name, run_id in summary.stage_runs.items():
        stage = next(s for s in cfg.training.stages if s.name == name)
        assert note[run_id].startswith(f"**Stage `{name}`**: {stage.steps} steps"), note[run_id]
        assert "final loss " in note[run_id] and f"`{card['id']}`" in note[run_id]
    assert "starting from scratch" in note[summary.stage_runs["image_pretrain"]]
    assert "previous stage's final checkpoint" in note[summary.stage_runs["finetune"]]
    assert note[summary.parent_run_id].startswith(
        f"**Plan `{cfg.name}`**: curation `curate-demo` -> `train-image_pretrain` -> `train-video_pretrain` -> "
        "`train-finetune`"), note[summary.parent_run_id]
    assert f"registered model `{summary.registered[0]}` version {summary.registered[1]}" in note[summary.parent_run_id]
