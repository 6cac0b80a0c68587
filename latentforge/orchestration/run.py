"""Curation and the training plan as MLflow runs: one parent per `run`, nested runs per job and stage."""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from latentforge.datasets import storage
from latentforge.orchestration.config import LatentforgeConfig
from latentforge.orchestration.notes import NOTE_TAG, curation_note, plan_note, stage_note
from latentforge.orchestration.tables import log_tables, reasons_table, stage_time_table
from latentforge.orchestration.tracking import Tracker, artifact_root, resolve_tracking_uri
from latentforge.pipelines.config import CurationConfig
from latentforge.training.config import PlanConfig

if TYPE_CHECKING:
    import pyarrow as pa

console = Console(stderr=True)
STATE_DIR = "state"  # completion markers of curation and stages: what a rerun may skip
SPOOL_DIR = "tracking-spool"  # tracking records not yet delivered (an MLflow outage)
CURATION_KEY_TAG = "latentforge.curation_key"  # the curation config hash: which curation run a rerun reopens
INPUTS_TAG = "latentforge.inputs_digest"  # ... and the inputs it read (discover.inputs_digest)


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
    """A tracker whose runs all carry the config hash, git commit and workdir, spooling under the workdir."""
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    return Tracker(resolve_tracking_uri(cfg.tracking.uri, cfg.workdir), cfg.tracking.experiment,
                   artifact_root(cfg.workdir), spool_dir=cfg.workdir / SPOOL_DIR,
                   run_tags={"latentforge.config_hash": cfg.config_hash(), "latentforge.workdir": str(cfg.workdir)})


def ensure_corpus(cur: CurationConfig) -> None:
    from latentforge.datasets.demo_corpus import DemoCorpusSpec, generate_demo_corpus

    if cur.generate_demo_corpus and not storage.is_remote(cur.input_dir) and not cur.input_dir.exists():
        console.print(f"[bold]generating the demo corpus[/] in {cur.input_dir}")
        generate_demo_corpus(cur.input_dir, DemoCorpusSpec(seed=cur.demo_seed))


def read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_marker(path: Path, body: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True))
    tmp.replace(path)


def curation_done(cfg: LatentforgeConfig, digest: str | None = None) -> dict | None:
    """The completion marker of this curation config, if its dataset is still there as it was written and was
    made from the inputs there now (`digest`: discover.inputs_digest of them; None: they cannot be listed, e.g.
    archived after curation, and the marker is trusted; a marker from before digests were recorded likewise)."""
    from latentforge.pipelines.curate import config_hash

    cur = cfg.curation
    marker = read_marker(cfg.workdir / STATE_DIR / f"curation-{cur.name}.json")
    card_location = storage.join(cur.output_dir, "card.json")
    card = json.loads(storage.read_text(card_location)) if storage.is_file(card_location) else None
    if not (marker and card and marker["config_hash"] == config_hash(cur) and marker["dataset_id"] == card.get("id")):
        return None
    if digest is not None and marker.get("inputs_digest") not in (None, digest):
        console.print(f"[yellow]inputs changed[/] under {cur.input_dir} since the curation finished (files added, "
                      "removed or rewritten): curating again; new files go to new shard groups, and only a group "
                      "that lost or holds a changed file is redone")
        return None
    return marker


def current_inputs(cur: CurationConfig) -> tuple[pa.Table | None, str | None]:
    """The inputs under `cur.input_dir` now (discover_table's rows) and their discover.inputs_digest; (None, None)
    when there are none to list. The job is handed these rows: one listing serves both the digest and the job (a
    second one costs a minute or more at millions of objects on s3), and the digest recorded is of the inputs
    the job curated, even when files arrive meanwhile."""
    from rich.progress import Progress, SpinnerColumn, TimeElapsedColumn

    from latentforge.pipelines.discover import discover_table, inputs_digest

    start = time.perf_counter()
    try:  # a million files take a minute or more to list: a counter while they are (on a terminal)
        with Progress(SpinnerColumn(), "[progress.description]{task.description}", "{task.completed:,} inputs",
                      TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal) as bar:
            task = bar.add_task(f"listing {cur.input_dir}", total=None)
            rows = discover_table(cur.input_dir, cur.samples_per_shard,
                                  progress=lambda n: bar.update(task, completed=n))
    except FileNotFoundError:
        return None, None
    if not rows.num_rows:
        return None, None
    console.print(f"listed {rows.num_rows:,} inputs under {cur.input_dir} in {time.perf_counter() - start:.1f} s")
    return rows, inputs_digest(rows)


def curation_match(cur: CurationConfig, digest: str | None) -> dict[str, str]:
    """The tags that name a curation's MLflow run: its config, and the inputs it read when they are known."""
    from latentforge.pipelines.curate import config_hash

    return {CURATION_KEY_TAG: config_hash(cur), **({INPUTS_TAG: digest} if digest else {})}


def child_run(tracker: Tracker, name: str, parent_id: str | None, tags: dict[str, str],
              match: dict[str, str] | None = None) -> str:
    run_id, resumed = tracker.resume_or_start(name, parent_id, tags, match=match)
    if resumed:
        console.print(f"[bold]resuming[/] MLflow run {name} ({run_id})")
    return run_id


def curate(cfg: LatentforgeConfig, tracker: Tracker, parent_id: str | None, summary: RunSummary) -> None:
    from latentforge.pipelines.curate import config_hash, run_curation
    from latentforge.pipelines.report import write_report

    cur = cfg.curation
    # The run belongs to the curation config, as a stage's run belongs to its key: a changed curation gets a
    # run of its own (the old run's params and artifacts keep describing the dataset it wrote), a resume of an
    # unchanged one reopens its run.
    # Inputs too: files added, removed or rewritten since make a new dataset version, curated incrementally.
    rows, digest = current_inputs(cur)
    done = curation_done(cfg, digest)
    if done:  # nothing to redo; the run that wrote it stays as it is
        match = curation_match(cur, done.get("inputs_digest"))
        summary.curation_run_id = tracker.find_run(f"curate-{cur.name}", parent_id, match) or done.get("run_id")
        console.print(f"[green]curation already done[/] -> {cur.output_dir} (id {done['dataset_id']})")
        return
    ensure_corpus(cur)
    if digest is None:  # nothing to list before: the demo corpus may just have been generated
        rows, digest = current_inputs(cur)
    match = curation_match(cur, digest)
    run_id = child_run(tracker, f"curate-{cur.name}", parent_id, {"latentforge.kind": "curation"}, match=match)
    summary.curation_run_id = run_id
    tracker.log_params(run_id, json.loads(cur.model_dump_json()))
    try:
        result = run_curation(cur, cur.output_dir, rows=rows)
    except BaseException:
        tracker.end_run(run_id, "FAILED")
        raise
    tracker.log_metrics(run_id, result.metrics())
    local = result.local_dir or result.dataset_dir  # a dataset on an object store: its tables as written
    write_report(local)
    if result.local_dir:
        storage.upload(local / "report.html", storage.join(result.dataset_dir, "report.html"))
    for name in ("card.json", "manifest.parquet", "rejects.parquet", "report.html"):
        tracker.log_artifact(run_id, local / name, "dataset")
    log_tables(tracker, run_id, local)
    tracker.log_dataset(run_id, result.dataset_dir, "curation_output")
    tracker.set_tags(run_id, {NOTE_TAG: curation_note(result)})
    tracker.end_run(run_id)
    write_marker(cfg.workdir / STATE_DIR / f"curation-{cur.name}.json",
                 {"config_hash": config_hash(cur), "dataset_id": result.card["id"], "run_id": run_id,
                  "dataset_dir": str(result.dataset_dir), "inputs_digest": digest})
    console.print(f"[green]curated[/] {result.kept}/{result.inputs} kept, {result.rejected} rejected, "
                  f"{result.filtered} filtered -> {result.dataset_dir}")
    if result.rejected or result.filtered:
        console.print(reasons_table(local))
    if result.groups.get("kept"):
        console.print("shard groups: {kept} kept from an earlier run, {redone} redone, {new} new"
                      .format(**result.groups))
    if result.stage_seconds:  # none when every group was already done
        console.print(stage_time_table(result.stage_seconds))


def stage_key(plan: PlanConfig, stage, cards: list[dict], previous_key: str) -> str:
    """What a stage's result depends on: plan, stage, dataset ids and the previous stage's key (a chain, so a
    changed stage invalidates the ones after it). The chaos hook and retry budget change nothing."""
    body = {"plan": plan.model_dump(mode="json", exclude={"stages", "datasets", "max_failures"}),
            "stage": stage.model_dump(mode="json", exclude={"fail_at_step"}),
            "datasets": [c["id"] for c in cards], "previous": previous_key}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def stage_done(marker_path: Path, key: str) -> dict | None:
    """A finished stage: a marker for this key, its final checkpoint, and exported weights with the recorded hash."""
    from latentforge.datasets.shards import sha256_file

    marker = read_marker(marker_path)
    if not marker or marker.get("key") != key:
        return None
    weights = Path(marker["export"]) / "model.safetensors"
    if not (Path(marker["checkpoint"]) / "ema.safetensors").is_file() or not weights.is_file():
        return None
    return marker if sha256_file(weights) == marker["weights_sha256"] else None


def train(cfg: LatentforgeConfig, tracker: Tracker, parent_id: str | None, summary: RunSummary) -> None:
    from latentforge.datasets.manifest import Dataset
    from latentforge.datasets.shards import sha256_file
    from latentforge.training.loader import stage_lineage

    plan: PlanConfig = cfg.training
    dataset_dirs = list(plan.datasets)  # local paths or URIs
    cards = [Dataset(d).card for d in dataset_dirs]
    previous: Path | None = None
    key = ""
    for stage in plan.stages:
        key = stage_key(plan, stage, cards, key)
        marker_path = cfg.workdir / STATE_DIR / f"stage-{stage.name}.json"
        lineage = stage_lineage([Dataset(d) for d in dataset_dirs], stage)
        done = stage_done(marker_path, key)
        if done:
            console.print(f"[green]stage {stage.name} already done[/]: {done['export']}")
            run_id = done["run_id"]
        else:
            run_id, checkpoint, export = train_stage_run(cfg, stage, key, tracker, parent_id, dataset_dirs,
                                                         cards, lineage, previous)
            done = {"key": key, "run_id": run_id, "checkpoint": str(checkpoint), "export": str(export),
                    "weights_sha256": sha256_file(export / "model.safetensors")}
            write_marker(marker_path, done)
        summary.stage_runs[stage.name] = run_id
        summary.checkpoints[stage.name] = Path(done["checkpoint"])
        summary.exports[stage.name] = Path(done["export"])
        previous = Path(done["checkpoint"])
        if stage is plan.stages[-1] and done.get("registered"):
            summary.registered = tuple(done["registered"])
        elif stage is plan.stages[-1] and register_final(cfg, tracker, run_id, parent_id, lineage, summary):
            write_marker(marker_path, {**done, "registered": list(summary.registered)})


def train_stage_run(cfg: LatentforgeConfig, stage, key: str, tracker: Tracker, parent_id: str | None,
                    dataset_dirs: list[Path], cards: list[dict], lineage: dict,
                    previous: Path | None) -> tuple[str, Path, Path]:
    """One stage as an MLflow run (reopened when resuming): fit (resumes from its checkpoint), export, log.

    Both the MLflow run and Ray Train's run directory belong to the stage's key: a rerun after a failure
    resumes them, a changed stage (or a changed stage before it) trains from its start in a run of its own.
    Under the stage's name alone Ray Train would reload the old run's last checkpoint, find its step count
    reached and hand back the old weights under the new key (and MLflow would append to the old run)."""
    from latentforge.training.trainer import fit_stage, model_config

    plan: PlanConfig = cfg.training
    run_id = child_run(tracker, f"train-{stage.name}", parent_id, {
        "latentforge.kind": "training", "latentforge.stage": stage.name, "latentforge.stage_key": key,
        "latentforge.datasets": ",".join(map(str, dataset_dirs)),
        "latentforge.dataset_ids": ",".join(str(d["id"]) for d in lineage["datasets"])},
        match={"latentforge.stage_key": key})
    tracker.log_dict(run_id, lineage, "lineage.json")
    log_stage_inputs(tracker, run_id, dataset_dirs, stage)
    tracker.log_params(run_id, {"stage": json.loads(stage.model_dump_json()), "model": model_config(plan, cards[0]),
                                "num_workers": plan.num_workers, "seed": plan.seed,
                                "init_from": str(previous) if previous else "none"})
    console.print(f"[bold]training stage[/] {stage.name}: {stage.steps} steps on {stage.modalities}")
    interval = cfg.tracking.system_metrics_interval_s if cfg.tracking.system_metrics else None
    try:
        result = fit_stage(plan, stage, dataset_dirs, cfg.storage.checkpoint_uri or cfg.workdir / "checkpoints",
                           f"{cfg.name}-{stage.name}-{key[:8]}", previous, tracker.sink(run_id, interval))
    except BaseException:
        tracker.replay(run_id)
        tracker.end_run(run_id, "FAILED")
        raise
    tracker.replay(run_id)  # what a worker could not deliver before it exited
    from latentforge.training.generate import sampling_record

    export = export_weights(result.checkpoint_dir, cfg.workdir / "exports" / stage.name, cards[0], lineage,
                            sampling_record(stage, cards))
    for f in sorted(export.iterdir()):
        tracker.log_artifact(run_id, f, "model")
    tracker.set_tags(run_id, {NOTE_TAG: stage_note(stage, lineage, result.metrics, previous)})
    tracker.end_run(run_id)
    return run_id, result.checkpoint_dir, export


def log_stage_inputs(tracker: Tracker, run_id: str, dataset_dirs: list[Path], stage) -> None:
    """Each manifest the stage reads, as an mlflow.data input: context "training", and "validation" for its
    held-out split. MLflow keeps one input per (name, digest) and run, so the split is named apart."""
    from latentforge.datasets.manifest import Dataset

    for d in dataset_dirs:
        tracker.log_dataset(run_id, d, "training")
        if stage.val_fraction > 0:
            tracker.log_dataset(run_id, d, "validation", name=f"{Dataset(d).card['name']}-validation")


def register_final(cfg: LatentforgeConfig, tracker: Tracker, run_id: str, parent_id: str | None, lineage: dict,
                   summary: RunSummary) -> bool:
    """The plan's final weights into the model registry, tagged with their data lineage and plan.

    Needs the server: during an outage it is left for the next `latentforge run` (which finds the stage done
    and registers only), with a warning, rather than failing a finished plan."""
    name = cfg.tracking.registered_model or cfg.name
    tags = {"latentforge.dataset_ids": ",".join(str(d["id"]) for d in lineage["datasets"]),
            "latentforge.plan_run_id": str(parent_id), "latentforge.stage": lineage["stage"],
            "latentforge.config_hash": cfg.config_hash()}
    try:
        if not tracker.flush(timeout_s=60):
            raise ConnectionError(f"MLflow at {tracker.uri} unreachable")
        summary.registered = (name, tracker.register_model(name, run_id, "model", tags))
    except Exception as e:
        console.print(f"[yellow]warning[/] model {name!r} not registered ({str(e).splitlines()[0][:200]}); "
                      f"rerun `latentforge run` on this workdir to register it")
        return False
    console.print(f"[green]registered[/] model {name!r} version {summary.registered[1]}")
    return True


def export_weights(checkpoint_dir: Path, out: Path, card: dict, lineage: dict, sampling: dict | None = None) -> Path:
    """The stage's final EMA weights as safetensors with the model config, dataset card and lineage beside them,
    and `sampling` (generate.sampling_record: what `latentforge generate` samples with)."""
    out.mkdir(parents=True, exist_ok=True)
    if sampling is not None:
        (out / "sampling.json").write_text(json.dumps(sampling, indent=2, sort_keys=True))
    shutil.copy(checkpoint_dir / "ema.safetensors", out / "model.safetensors")
    shutil.copy(checkpoint_dir / "model_config.json", out / "model_config.json")
    (out / "dataset_card.json").write_text(json.dumps(card, indent=2, sort_keys=True))
    (out / "lineage.json").write_text(json.dumps({"checkpoint": str(checkpoint_dir), **lineage}, indent=2))
    return out


def run_all(cfg: LatentforgeConfig, *, do_curate: bool = True, do_train: bool = True) -> RunSummary:
    """Curation then training under one parent run (either part alone when asked).

    On an existing workdir this resumes: the parent run and its child runs are reopened, not duplicated;
    finished curation and finished stages (completion markers under WORKDIR/state) are skipped; the stage
    that was interrupted resumes from its last checkpoint; tracking records an outage left behind in
    WORKDIR/tracking-spool are delivered.
    """
    storage.configure(cfg.storage)  # this process's object-store settings; Ray workers get them via runtime_env
    tracker = make_tracker(cfg)
    if tracker.replay():
        console.print("delivered tracking records left by an earlier run")
    summary = RunSummary(dataset_dirs=cfg.dataset_dirs(), experiment_id=tracker.experiment_id)
    # Only a plan run: its child runs carry the workdir tag too, and one may have the plan's name.
    parent, resumed = tracker.resume_or_start(cfg.name, tags={"latentforge.kind": "plan"}, top_level=True,
                                              match={"latentforge.workdir": str(cfg.workdir),
                                                     "latentforge.kind": "plan"})
    if resumed:
        console.print(f"[bold]resuming[/] plan {cfg.name} in {cfg.workdir} (MLflow run {parent})")
    summary.parent_run_id = parent
    tracker.log_params(parent, json.loads(cfg.model_dump_json()))
    try:
        if do_curate:
            curate(cfg, tracker, parent, summary)
        if do_train and cfg.training is not None:
            train(cfg, tracker, parent, summary)
    except BaseException:
        tracker.end_run(parent, "FAILED")
        tracker.close(timeout_s=10)
        raise
    curated = summary.curation_run_id or read_marker(cfg.workdir / STATE_DIR / f"curation-{cfg.curation.name}.json")
    cur_run = f"curate-{cfg.curation.name}" if curated else None
    tracker.set_tags(parent, {NOTE_TAG: plan_note(cfg.name, cur_run, [f"train-{s}" for s in summary.stage_runs],
                                                  summary.registered)})
    tracker.end_run(parent)
    tracker.close()
    return summary
