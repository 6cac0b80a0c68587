"""Curation from s3:// to s3://, and a training stage reading that dataset with its checkpoints on s3://,
against a real S3-compatible HTTP server on loopback (moto_server) and a real local Ray."""
from __future__ import annotations

import json

import pytest

from latentforge.datasets import manifest as mf
from latentforge.datasets import storage
from latentforge.datasets.demo_corpus import DemoCorpusSpec, generate_demo_corpus
from latentforge.datasets.verify import verify_dataset
from latentforge.pipelines.config import CurationConfig
from latentforge.pipelines.curate import run_curation
from latentforge.pipelines.discover import discover
from latentforge.pipelines.report import write_report
from latentforge.training.config import PlanConfig
from latentforge.training.trainer import fit_stage

# slow: a curation job, a tracked rerun and two training runs: 165 s on the shared 2-core machine (load ~45)
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.heavy]


@pytest.fixture(scope="module")
def curated(s3_server, ray_local, tmp_path_factory):
    """A tiny corpus uploaded to a bucket and curated from there into the same bucket."""
    bucket = s3_server.create_bucket("lf-curation")
    tmp = tmp_path_factory.mktemp("s3-curation")
    generate_demo_corpus(tmp / "corpus", DemoCorpusSpec(num_images=4, num_videos=1, num_audio=2, seed=5))
    storage.upload(tmp / "corpus", f"s3://{bucket}/corpus")
    # Everything the job's Ray workers need arrives through their runtime_env, not through this process.
    storage.configure(storage.StorageConfig(endpoint_url=s3_server.endpoint_url, cache_dir=tmp / "cache"))
    cfg = CurationConfig(input_dir=f"s3://{bucket}/corpus", output_dir=f"s3://{bucket}/ds", samples_per_shard=4)
    result = run_curation(cfg, cfg.output_dir)
    yield bucket, cfg, result
    storage.configure(None)


def test_curation_reads_and_writes_s3(curated):
    bucket, cfg, result = curated
    root = f"s3://{bucket}/ds"
    assert result.dataset_dir == root and result.local_dir is not None and result.kept > 0
    # auto: to a URI the stage actors write (and upload) the groups, so no latent goes through the driver
    assert result.groups_written == {"workers": -(-result.inputs // cfg.samples_per_shard), "driver": 0}
    files = storage.list_files(root)
    tars = [f for f in files if f.startswith("shards/") and f.endswith(".tar")]
    assert {mf.MANIFEST, mf.REJECTS, mf.CARD} <= set(files) and tars
    assert not [f for f in files if "partial" in f]
    groups = {r["shard"] for r in discover(cfg.input_dir, cfg.samples_per_shard)}
    assert {f for f in files if f.startswith("shards/_done/")} == {f"shards/_done/group-{g:06d}.json" for g in groups}
    card = json.loads(storage.read_text(f"{root}/{mf.CARD}"))
    assert sorted(f"shards/{s['name']}" for s in card["shards"]) == sorted(tars)

    report = verify_dataset(root)
    assert report.ok, report.problems
    assert report.checked["shards"] == len(tars) and report.checked["samples"] == result.kept
    from typer.testing import CliRunner

    from latentforge.orchestration.cli import app

    verified = CliRunner().invoke(app, ["verify", root])  # the command takes the URI too
    assert verified.exit_code == 0 and f"ok {root}: checked {len(tars)} shards" in verified.output, verified.output

    # Every input object is accounted for: a manifest row or a rejects row, none twice.
    ds = mf.Dataset(root)
    manifest, rejects = ds.manifest().to_pylist(), ds.rejects().to_pylist()
    inputs = {r["id"]: r["uri"] for r in discover(cfg.input_dir, cfg.samples_per_shard)}
    assert {r["source_id"] for r in manifest} | {r["source_id"] for r in rejects} == set(inputs)
    assert all(r["uri"] == inputs[r["source_id"]] and r["uri"].startswith(f"s3://{bucket}/corpus/") for r in manifest)
    assert {"missing_caption", "empty_file"} <= {r["reason"] for r in rejects}  # broken files read from S3 too
    assert result.inputs == len(inputs)

    # The report decodes thumbnails from scratch copies of the objects and lands beside the dataset.
    assert write_report(root) == f"{root}/report.html"
    assert CliRunner().invoke(app, ["report", root]).exit_code == 0
    page = storage.read_text(f"{root}/report.html")
    assert page.count("data:image/png;base64") >= 3


def test_a_rerun_on_s3_trusts_the_uploaded_markers(curated):
    bucket, cfg, first = curated
    again = run_curation(cfg, f"s3://{bucket}/ds")  # every group has an intact marker: no pipeline runs
    assert json.dumps(again.card, sort_keys=True) == json.dumps(first.card, sort_keys=True)
    assert (again.kept, again.rejected, again.filtered) == (first.kept, first.rejected, first.filtered)


def test_select_reads_and_writes_s3_linked_or_repacked(curated, tmp_path):
    """`select` from a dataset on s3: to s3 (shards copied inside the store), repacked to s3 (parent shards
    streamed and checked, new tars uploaded), and repacked to a local directory; each child verifies."""
    from typer.testing import CliRunner

    from latentforge.datasets.select import select_dataset
    from latentforge.orchestration.cli import app

    bucket, _, result = curated
    root = f"s3://{bucket}/ds"
    images = [r["id"] for r in mf.Dataset(root).manifest().to_pylist() if r["modality"] == "image"]
    linked = select_dataset(root, f"s3://{bucket}/sel", "modality == 'image'")
    assert linked["num_samples"] == len(images) and verify_dataset(f"s3://{bucket}/sel").ok
    assert {f"shards/{s['name']}" for s in linked["shards"]} <= set(storage.list_files(f"s3://{bucket}/sel"))
    with pytest.raises(FileExistsError):
        select_dataset(root, f"s3://{bucket}/sel", None)
    packed = select_dataset(root, f"s3://{bucket}/packed", None, repack=True)
    assert len(packed["shards"]) == 1 and packed["num_samples"] == result.kept
    report = verify_dataset(f"s3://{bucket}/packed")
    assert report.ok and report.checked["samples"] == result.kept, report.problems
    cli = CliRunner().invoke(app, ["select", root, "--out", str(tmp_path / "local"), "--repack", "--where",
                                   "modality == 'image'"])
    assert cli.exit_code == 0 and f"selected {len(images)} samples" in cli.output, cli.output
    assert sorted(mf.Dataset(tmp_path / "local").manifest()["id"].to_pylist()) == sorted(images)
    assert verify_dataset(tmp_path / "local").ok
    # a parent whose last shard is gone: named before anything is uploaded
    storage.download(root, tmp_path / "parent")
    shards = mf.Dataset(tmp_path / "parent").card["shards"]
    assert len(shards) >= 2
    (tmp_path / "parent" / mf.SHARDS / shards[-1]["name"]).unlink()
    with pytest.raises(ValueError, match=f"missing .*{shards[-1]['name']}"):
        select_dataset(tmp_path / "parent", f"s3://{bucket}/broken", None)
    assert storage.list_files(f"s3://{bucket}/broken") == []
    # one that breaks half-way (a shard cut short, found by the repack): what reached the URI is removed
    path = tmp_path / "parent" / mf.SHARDS / shards[-2]["name"]
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(ValueError, match=shards[-2]["name"]):
        select_dataset(tmp_path / "parent", f"s3://{bucket}/broken", f"shard != '{shards[-1]['name']}'", repack=True)
    assert storage.list_files(f"s3://{bucket}/broken") == []


def test_run_tracks_a_curation_that_lives_on_s3(curated, s3_server, mlflow_server, tmp_path):
    """`latentforge run`'s curation part: storage from the config, report and tables logged from the local
    copies, the MLflow dataset input pointing at the manifest in the bucket."""
    from mlflow.tracking import MlflowClient

    from latentforge.orchestration.config import LatentforgeConfig, resolve_paths
    from latentforge.orchestration.run import run_all

    bucket, cur, first = curated
    cfg = resolve_paths(LatentforgeConfig.model_validate({
        "name": "s3-run", "workdir": str(tmp_path / "work"),
        "tracking": {"uri": mlflow_server, "experiment": "s3-storage-test"},
        "curation": json.loads(cur.model_dump_json()),  # the same config: its shard groups are all done
        "storage": {"endpoint_url": s3_server.endpoint_url, "cache_dir": str(tmp_path / "cache")}}), tmp_path)
    storage.configure(None)  # run_all must set it from the config
    summary = run_all(cfg, do_train=False)  # every shard group is done: only tables, card, report, tracking
    client = MlflowClient(mlflow_server)
    logged = {a.path for a in client.list_artifacts(summary.curation_run_id, "dataset")}
    assert {"dataset/report.html", "dataset/card.json", "dataset/manifest.parquet", "dataset/rejects.csv"} <= logged
    inputs = client.get_run(summary.curation_run_id).inputs.dataset_inputs
    assert [json.loads(i.dataset.source)["uri"] for i in inputs] == [f"s3://{bucket}/ds/manifest.parquet"]
    assert storage.is_file(f"s3://{bucket}/ds/report.html")
    assert json.loads(storage.read_text(f"s3://{bucket}/ds/card.json"))["id"] == first.card["id"]


def test_training_reads_the_s3_dataset_and_checkpoints_to_s3(curated, s3_server):
    bucket, _, _ = curated
    plan = PlanConfig.model_validate({
        "model": {"preset": "DiT-T", "overrides": {"hidden": 32, "depth": 1, "mixer_depth": 1}},
        "num_workers": 1, "cpus_per_worker": 1, "datasets": [f"s3://{bucket}/ds"],
        "stages": [{"name": "s3stage", "modalities": ["image"], "steps": 2, "batch_size": 2, "checkpoint_every": 1,
                    "log_every": 1, "num_samples": 0}]})
    assert plan.datasets == [f"s3://{bucket}/ds"]  # the URI survives config validation
    result = fit_stage(plan, plan.stages[0], plan.datasets, f"s3://{bucket}/runs", "s3-run")
    assert result.metrics["step"] == 2
    objects = storage.list_files(f"s3://{bucket}/runs/s3-run")
    checkpoints = {f.split("/")[0] for f in objects if f.startswith("checkpoint_") and f.endswith("/ema.safetensors")}
    assert len(checkpoints) == 2  # one per step, num_to_keep=2
    assert result.checkpoint_uri.startswith(f"s3://{bucket}/runs/s3-run/checkpoint_")
    assert storage.is_file(f"{result.checkpoint_uri}/model.safetensors")
    assert (result.checkpoint_dir / "ema.safetensors").read_bytes() == storage.read_bytes(
        f"{result.checkpoint_uri}/ema.safetensors")
    assert json.loads((result.checkpoint_dir / "state.json").read_text())["step"] == 2

    # The same run name again, one step longer: workers restore the step-2 checkpoint from the bucket.
    longer = plan.stages[0].model_copy(update={"steps": 3})
    resumed = fit_stage(plan, longer, plan.datasets, f"s3://{bucket}/runs", "s3-run")
    assert resumed.metrics["step"] == 3 and resumed.checkpoint_uri != result.checkpoint_uri
    state = json.loads(storage.read_text(f"{resumed.checkpoint_uri}/state.json"))
    assert state["step"] == 3 and state["data_position"] == 3
    kept = {f.split("/")[0] for f in storage.list_files(f"s3://{bucket}/runs/s3-run") if f.endswith("/state.json")}
    assert kept == {result.checkpoint_uri.rsplit("/", 1)[1], resumed.checkpoint_uri.rsplit("/", 1)[1]}
