"""Curation and the training plan as MLflow runs: one parent per `run`, nested runs per job and stage."""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from latentforge.orchestration.config import LatentforgeConfig
from latentforge.orchestration.tracking import Tracker, artifact_root, resolve_tracking_uri
from latentforge.pipelines.config import CurationConfig
from latentforge.training.config import PlanConfig

console = Console(stderr=True)


@dataclass
class RunSummary:
    parent_run_id: str | None = None
    curation_run_id: str | None = None
    dataset_dirs: list[Path] = field(default_factory=list)
    stage_runs: dict[str, str] = field(default_factory=dict)
    checkpoints: dict[str, Path] = field(default_factory=dict)
    exports: dict[str, Path] = field(default_factory=dict)
    registered: tuple[str, str] | None = None
    experiment_id: str | None = None


def make_tracker(cfg: LatentforgeConfig) -> Tracker:
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    return Tracker(resolve_tracking_uri(cfg.tracking.uri, cfg.workdir), cfg.tracking.experiment,
                   artifact_root(cfg.workdir))


def ensure_corpus(cur: CurationConfig) -> None:
    from latentforge.datasets.demo_corpus import DemoCorpusSpec, generate_demo_corpus

    if cur.generate_demo_corpus and not cur.input_dir.exists():
        console.print(f"[bold]generating the demo corpus[/] in {cur.input_dir}")
        generate_demo_corpus(cur.input_dir, DemoCorpusSpec(seed=cur.demo_seed))


def curate(cfg: LatentforgeConfig, tracker: Tracker, parent_id: str | None, summary: RunSummary) -> None:
    from latentforge.pipelines.curate import run_curation
    from latentforge.pipelines.report import write_report

    cur = cfg.curation
    ensure_corpus(cur)
    run_id = tracker.start_run(f"curate-{cur.name}", parent_id, tags={"latentforge.kind": "curation",
                                                                    "latentforge.config_hash": cfg.config_hash()})
    summary.curation_run_id = run_id
    tracker.log_params(run_id, json.loads(cur.model_dump_json()))
    try:
        result = run_curation(cur, cur.output_dir)
    except BaseException:
        tracker.end_run(run_id, "FAILED")
        raise
    tracker.log_metrics(run_id, result.metrics())
    write_report(result.dataset_dir)
    for name in ("card.json", "manifest.parquet", "rejects.parquet", "report.html"):
        tracker.log_artifact(run_id, result.dataset_dir / name, "dataset")
    log_tables(tracker, run_id, result.dataset_dir)
    tracker.end_run(run_id)
    console.print(f"[green]curated[/] {result.kept}/{result.inputs} kept, {result.rejected} rejected, "
                  f"{result.filtered} filtered -> {result.dataset_dir}")


def log_tables(tracker: Tracker, run_id: str, dataset_dir: Path) -> None:
    """Readable copies for the MLflow UI: rejects and a manifest summary as CSV."""
    from latentforge.datasets.manifest import Dataset

    ds = Dataset(dataset_dir)
    with tempfile.TemporaryDirectory() as tmp:
        rejects = Path(tmp) / "rejects.csv"
        ds.rejects().to_pandas().to_csv(rejects, index=False)
        summary = Path(tmp) / "manifest_summary.csv"
        frame = ds.manifest().to_pandas()
        frame.groupby(["modality", "bucket"]).agg(samples=("id", "count")).reset_index().to_csv(summary, index=False)
        tracker.log_artifact(run_id, rejects, "dataset")
        tracker.log_artifact(run_id, summary, "dataset")


def train(cfg: LatentforgeConfig, tracker: Tracker, parent_id: str | None, summary: RunSummary) -> None:
    from latentforge.datasets.manifest import Dataset
    from latentforge.training.loader import stage_lineage
    from latentforge.training.trainer import fit_stage, model_config

    plan: PlanConfig = cfg.training
    dataset_dirs = [Path(d) for d in plan.datasets]
    card = Dataset(dataset_dirs[0]).card
    storage = cfg.workdir / "checkpoints"
    previous: Path | None = None
    for stage in plan.stages:
        run_id = tracker.start_run(f"train-{stage.name}", parent_id, tags={
            "latentforge.kind": "training", "latentforge.stage": stage.name,
            "latentforge.datasets": ",".join(map(str, dataset_dirs)), "latentforge.config_hash": cfg.config_hash()})
        summary.stage_runs[stage.name] = run_id
        lineage = stage_lineage([Dataset(d) for d in dataset_dirs], stage)
        tracker.client.set_tag(run_id, "latentforge.dataset_ids", ",".join(str(d["id"]) for d in lineage["datasets"]))
        tracker.log_dict(run_id, lineage, "lineage.json")
        tracker.log_params(run_id, {"stage": json.loads(stage.model_dump_json()), "model": model_config(plan, card),
                                    "num_workers": plan.num_workers, "seed": plan.seed,
                                    "init_from": str(previous) if previous else "none"})
        console.print(f"[bold]training stage[/] {stage.name}: {stage.steps} steps on {stage.modalities}")
        try:
            result = fit_stage(plan, stage, dataset_dirs, storage, f"{cfg.name}-{stage.name}", previous,
                               tracker.sink(run_id))
        except BaseException:
            tracker.end_run(run_id, "FAILED")
            raise
        export = export_weights(result.checkpoint_dir, cfg.workdir / "exports" / stage.name, card, lineage)
        for f in sorted(export.iterdir()):
            tracker.log_artifact(run_id, f, "model")
        tracker.end_run(run_id)
        summary.checkpoints[stage.name] = result.checkpoint_dir
        summary.exports[stage.name] = export
        previous = result.checkpoint_dir
        if stage is plan.stages[-1]:
            register_final(cfg, tracker, run_id, parent_id, lineage, summary)


def register_final(cfg: LatentforgeConfig, tracker: Tracker, run_id: str, parent_id: str | None, lineage: dict,
                   summary: RunSummary) -> None:
    """The plan's final weights into the model registry, tagged with their data lineage and plan."""
    name = cfg.tracking.registered_model or cfg.name
    tags = {"latentforge.dataset_ids": ",".join(str(d["id"]) for d in lineage["datasets"]),
            "latentforge.plan_run_id": str(parent_id), "latentforge.stage": lineage["stage"],
            "latentforge.config_hash": cfg.config_hash()}
    summary.registered = (name, tracker.register_model(name, run_id, "model", tags))
    console.print(f"[green]registered[/] model {name!r} version {summary.registered[1]}")


def export_weights(checkpoint_dir: Path, out: Path, card: dict, lineage: dict) -> Path:
    """The stage's final EMA weights as safetensors with the model config, dataset card and lineage beside them."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(checkpoint_dir / "ema.safetensors", out / "model.safetensors")
    shutil.copy(checkpoint_dir / "model_config.json", out / "model_config.json")
    (out / "dataset_card.json").write_text(json.dumps(card, indent=2, sort_keys=True))
    (out / "lineage.json").write_text(json.dumps({"checkpoint": str(checkpoint_dir), **lineage}, indent=2))
    return out


def run_all(cfg: LatentforgeConfig, *, do_curate: bool = True, do_train: bool = True) -> RunSummary:
    """Curation then training under one parent run (either part alone when asked)."""
    tracker = make_tracker(cfg)
    summary = RunSummary(dataset_dirs=cfg.dataset_dirs(), experiment_id=tracker.experiment_id)
    parent = tracker.start_run(cfg.name, tags={"latentforge.kind": "plan", "latentforge.config_hash": cfg.config_hash()})
    summary.parent_run_id = parent
    tracker.log_params(parent, json.loads(cfg.model_dump_json()))
    try:
        if do_curate:
            curate(cfg, tracker, parent, summary)
        if do_train and cfg.training is not None:
            train(cfg, tracker, parent, summary)
    except BaseException:
        tracker.end_run(parent, "FAILED")
        raise
    tracker.end_run(parent)
    return summary
