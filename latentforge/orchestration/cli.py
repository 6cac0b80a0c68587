"""`latentforge` command line: typed values resolved here, then handed down."""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(help="Curate media into latent shards and train DiT curricula on Ray, tracked in MLflow.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
console = Console()

ConfigArg = Annotated[Path, typer.Argument(help="YAML config (see configs/)", exists=True, dir_okay=False)]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override a key: --set training.stages.0.steps=50")]
AddressOpt = Annotated[Optional[str], typer.Option(
    "--address", help="an existing Ray cluster (e.g. 10.0.0.5:6379 or auto); default: ray.address, else "
                      "RAY_ADDRESS, else start a local Ray")]
TrackingUriOpt = Annotated[Optional[str], typer.Option(
    help="MLflow server or store of a models:/ or runs:/ URI (default: $MLFLOW_TRACKING_URI)")]


def _load(config: Path | None, overrides: list[str] | None):
    from latentforge.orchestration.config import ConfigError, load_config, resolve_paths

    try:
        return resolve_paths(load_config(config, overrides or []), Path.cwd())
    except ConfigError as e:
        console.print(f"[red]config error[/] {escape(str(e))}")
        raise typer.Exit(2)


@app.command("demo-corpus")
def demo_corpus(directory: Annotated[Path, typer.Argument(help="where to write the corpus")],
                seed: int = 0, broken: Annotated[bool, typer.Option(help="include broken files")] = True) -> None:
    """Generate the demo corpus: images, videos and audio with ground-truth captions, plus broken files."""
    from latentforge.datasets.demo_corpus import DemoCorpusSpec, generate_demo_corpus

    index = generate_demo_corpus(directory, DemoCorpusSpec(seed=seed, include_broken=broken))
    console.print(f"wrote {len(index['files'])} files to {directory} (index: {directory / 'corpus.json'})")


@app.command()
def validate(config: ConfigArg, set_: SetOpt = None) -> None:
    """Check a config without running anything; errors name each bad key by its path."""
    cfg = _load(config, set_)
    stages = [s.name for s in cfg.training.stages] if cfg.training else []
    console.print(f"[green]ok[/] {config}: run {cfg.name!r}, workdir {cfg.workdir}, training stages {stages}")


@app.command()
def curate(config: ConfigArg, set_: SetOpt = None,
           dry_run: Annotated[bool, typer.Option(help="print the stage graph and stop")] = False,
           address: AddressOpt = None) -> None:
    """Run the curation job only (its own MLflow run)."""
    cfg = _load(config, set_)
    if dry_run:
        _print_stage_graph(cfg)
        return
    _execute(cfg, do_curate=True, do_train=False, address=address)


@app.command()
def train(config: ConfigArg, set_: SetOpt = None, address: AddressOpt = None) -> None:
    """Run the training plan on an already curated dataset."""
    cfg = _load(config, set_)
    if cfg.training is None:
        console.print("[red]config has no `training` section[/]")
        raise typer.Exit(2)
    _execute(cfg, do_curate=False, do_train=True, address=address)


@app.command()
def run(config: ConfigArg, set_: SetOpt = None, address: AddressOpt = None) -> None:
    """Curation then the whole training plan, under one MLflow parent run."""
    _execute(_load(config, set_), do_curate=True, do_train=True, address=address)


@app.command()
def verify(dataset: Annotated[str, typer.Argument(
               help="a curated dataset directory; or a stage's lineage: its export (WORKDIR/exports/STAGE), a "
                    "lineage.json, or an MLflow URI of its model (models:/NAME/VERSION, runs:/RUN_ID/model)")],
           decode: Annotated[bool, typer.Option(help="read every sample, not just checksums and counts")] = True,
           tracking_uri: TrackingUriOpt = None,
           ) -> None:
    """Re-check a dataset, or that the shards a trained stage read are still as they were.

    A dataset: card vs manifest vs shards (counts, sha256, schema, sample shapes).

    A trained stage: every shard it read is still there with the sha256 its lineage recorded."""
    import json
    import tempfile

    from latentforge.datasets import storage
    from latentforge.datasets.verify import verify_dataset, verify_lineage
    from latentforge.orchestration.registry import export_source

    with tempfile.TemporaryDirectory() as tmp:
        try:
            target = export_source(dataset, tracking_uri, Path(tmp))
        except ValueError as e:
            console.print(f"[red]cannot verify:[/] {escape(str(e))}")
            raise typer.Exit(2)
        lineage = target / "lineage.json" if target.is_dir() else target
        label = dataset
        if lineage.name == "lineage.json" and lineage.is_file():
            report = verify_lineage(json.loads(lineage.read_text()))
            label = f"{dataset} ({report.root})"
        elif storage.is_remote(dataset) or target.is_dir():
            report = verify_dataset(dataset if storage.is_remote(dataset) else target, decode=decode)
        else:
            console.print(f"[red]cannot verify[/] {escape(dataset)}: not a dataset directory, an export or a "
                          "lineage.json")
            raise typer.Exit(2)
    for note in report.notes:
        console.print(f"[yellow]note[/] {escape(note)}")
    checked = ", ".join(f"{n} {what}" for what, n in report.checked.items()) or "nothing"
    if report.ok:
        console.print(f"[green]ok[/] {label}: checked {checked}")
        return
    console.print(f"[red]{len(report.problems)} problem(s)[/] in {label} (checked {checked}):")
    for problem in report.problems:
        console.print(f"  {escape(problem)}")
    raise typer.Exit(1)


@app.command()
def select(dataset: Annotated[str, typer.Argument(help="a curated dataset directory or URI (s3://...)")],
           out: Annotated[str, typer.Option("--out", help="where to write the child dataset (a directory or URI)")],
           where: Annotated[Optional[str], typer.Option(
               help="e.g. \"score_motion > 0.3 and score_text_area < 0.05\"")] = None,
           modality: Annotated[Optional[list[str]], typer.Option(help="keep only these modalities")] = None,
           repack: Annotated[bool, typer.Option(
               help="write the selected samples into new shards (members copied byte for byte) instead of linking "
                    "the parent's: for a selection that keeps a small part, or, without --where, to compact a "
                    "dataset grown by many small incremental curations")] = False,
           shard_mb: Annotated[Optional[float], typer.Option(
               help="with --repack: largest shard in MB (default: the parent curation's max_shard_mb)")] = None,
           ) -> None:
    """A subset chosen from the manifest alone (no recompute), or a dataset compacted (--repack).

    Shards are linked from the parent (with --repack: the selected samples written anew); the card names it."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    from latentforge.datasets import storage
    from latentforge.datasets.select import select_dataset

    if not storage.is_remote(dataset) and not Path(dataset).is_dir():
        console.print(f"[red]cannot select[/] {escape(dataset)}: not a dataset directory")
        raise typer.Exit(2)
    try:
        with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                      TimeRemainingColumn(), console=console, disable=not repack) as bar:
            task = bar.add_task("repacking (parent shards read)", total=None)
            card = select_dataset(dataset, out, where, modality, repack=repack, shard_mb=shard_mb,
                                  progress=lambda done, total: bar.update(task, completed=done, total=total))
    except (ValueError, FileExistsError) as e:
        console.print(f"[red]cannot select:[/] {escape(str(e))}")
        raise typer.Exit(2)
    packed = f", repacked into {len(card['shards'])} shard{'s' * (len(card['shards']) != 1)}" if repack else ""
    console.print(f"[green]selected[/] {card['num_samples']} samples {card['modalities']} -> {out} "
                  f"(id {card['id']}{packed})")


@app.command()
def generate(model: Annotated[str, typer.Argument(
                 help="a stage export (WORKDIR/exports/STAGE), or an MLflow URI of one: models:/NAME/VERSION (the "
                      "registered model) or runs:/RUN_ID/model (a stage run)")],
             prompt: Annotated[Optional[list[str]], typer.Option(
                 "--prompt", "-p", help="text to generate from (repeat it)")] = None,
             prompts_file: Annotated[Optional[Path], typer.Option(
                 help="a text file of prompts, one per line (blank lines and lines starting with # skipped)",
                 exists=True, dir_okay=False)] = None,
             out: Annotated[Path, typer.Option(help="where to write the samples")] = Path("generated"),
             modality: Annotated[str, typer.Option(help="image, video or audio")] = "image",
             bucket: Annotated[Optional[str], typer.Option(
                 help="latent size as the dataset names its buckets: 1x32x32 (image), 4x32x32 (video), "
                      "8000samples@8000Hz (audio); default: the dataset's most used one of that modality")] = None,
             steps: Annotated[Optional[int], typer.Option(help="sampler steps (default: the stage's)")] = None,
             cfg_scale: Annotated[Optional[float], typer.Option(
                 help="classifier-free guidance scale (default: the stage's)")] = None,
             sampler: Annotated[Optional[str], typer.Option(help="euler or heun (default: the stage's)")] = None,
             seed: Annotated[int, typer.Option(help="noise seed of the first prompt; prompt i uses seed + i")] = 0,
             device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
             tracking_uri: TrackingUriOpt = None,
             dataset: Annotated[Optional[str], typer.Option(
                 help="MODEL is a training checkpoint directory (checkpoint_*: its EMA weights), not an export: "
                      "the dataset it trained on, for its encoders and statistics")] = None,
             ) -> None:
    """Samples from a trained stage for any prompts, through its dataset's encoders: PNG / GIF / WAV and a grid."""
    import tempfile

    import torch

    from latentforge.orchestration.registry import export_source
    from latentforge.training.generate import generate_from_prompts, load_export

    prompts = list(prompt or [])
    if prompts_file is not None:
        lines = prompts_file.read_text(encoding="utf-8").splitlines()
        prompts += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        console.print("[red]cannot generate:[/] no prompt; give --prompt TEXT (repeatable) or --prompts-file FILE")
        raise typer.Exit(2)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            export = load_export(export_source(model, tracking_uri, Path(tmp)), device, dataset)
            files = generate_from_prompts(export, prompts, out, modality, bucket, steps, cfg_scale, sampler, seed)
        except (ValueError, FileNotFoundError) as e:
            console.print(f"[red]cannot generate:[/] {escape(str(e))}")
            raise typer.Exit(2)
    console.print(f"[green]wrote[/] {len(files)} files to {out}: " + ", ".join(f.name for f in files[:6])
                  + (" ..." if len(files) > 6 else ""))


@app.command()
def report(dataset: Annotated[str, typer.Argument(help="a curated dataset directory or URI (s3://...)")],
           out: Annotated[Optional[Path], typer.Option(help="default: DATASET/report.html")] = None) -> None:
    """An HTML curation report: counts, rejection reasons, score histograms, thumbnails of kept and rejected."""
    from latentforge.datasets import storage
    from latentforge.pipelines.report import write_report

    if not storage.is_remote(dataset) and not Path(dataset).is_dir():
        console.print(f"[red]cannot report[/] {escape(dataset)}: not a dataset directory")
        raise typer.Exit(2)
    console.print(f"wrote {write_report(dataset, out)}")


@app.command()
def ui(workdir: Annotated[Path, typer.Option(help="workdir whose MLflow store to serve")] = Path("lf-work"),
       port: int = 5000,
       host: Annotated[str, typer.Option(help="bind address; anything but loopback exposes the server")] = "127.0.0.1",
       backend_store_uri: Annotated[Optional[str], typer.Option(
           help="serve this store instead of WORKDIR/mlflow.db, e.g. postgresql://user@db/mlflow "
                "(pip install 'latentforge\\[postgres]')")] = None,
       artifacts_destination: Annotated[Optional[str], typer.Option(
           help="artifact store; default WORKDIR/mlartifacts")] = None,
       auth: Annotated[bool, typer.Option(
           help="MLflow basic auth (pip install 'latentforge\\[auth]'); the first start needs "
                "MLFLOW_AUTH_ADMIN_PASSWORD; clients set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")] = False,
       ) -> None:
    """Start a real `mlflow server` on the workdir's store (or --backend-store-uri) and print its URL."""
    from latentforge.orchestration.ui import UiError, check_port, is_loopback, server_command

    if not is_loopback(host):
        console.print(f"[bold red]WARNING[/] binding to {escape(host)}: the MLflow server is reachable from the "
                      "network" + ("" if auth else ", WITHOUT authentication (anyone who reaches it can read and "
                                                   "delete runs and models; add --auth)"), style="red")
    try:
        server = server_command(workdir, port, host, backend_store_uri, artifacts_destination, auth)
        check_port(host, port)
    except UiError as e:
        console.print(f"[red]cannot start the UI:[/] {escape(str(e))}")
        raise typer.Exit(2)
    console.print(f"MLflow UI at [bold]{server.url}[/]  (Ctrl-C to stop)")
    sys.stdout.flush()
    os.execve(server.argv[0], server.argv, server.env)  # become the server: signals (Ctrl-C, SIGTERM) reach it


@app.command()
def submit(
    config: Annotated[Path, typer.Argument(help="YAML config; uploaded with --working-dir when it lies inside it",
                                           exists=True, dir_okay=False)],
    set_: SetOpt = None,
    address: Annotated[Optional[str], typer.Option(
        help="the cluster's Ray Jobs API (dashboard) URL; default: RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, "
             "else http://127.0.0.1:8265")] = None,
    command: Annotated[str, typer.Option(
        help="latentforge command the job runs: run, curate, train or validate")] = "run",
    working_dir: Annotated[Optional[Path], typer.Option(
        help="directory uploaded as the job's working dir (files in .gitignore are skipped)", file_okay=False,
        exists=True)] = Path("."),
    no_upload: Annotated[bool, typer.Option("--no-upload", help="upload nothing: code and config are already "
                                                               "on the cluster (image or shared filesystem)")] = False,
    pip: Annotated[Optional[list[str]], typer.Option(help="extra pip requirement for the job's runtime env "
                                                          "(repeatable)")] = None,
    env: Annotated[Optional[list[str]], typer.Option(help="KEY=VALUE for the job (repeatable); MLFLOW_TRACKING_URI "
                                                          "and MLflow credentials are forwarded when set")] = None,
    wait: Annotated[bool, typer.Option(help="stream the job's logs and exit with its status")] = True,
) -> None:
    """Submit `latentforge run CONFIG` (or --command) to a Ray cluster as a Ray Job, then stream its logs."""
    from latentforge.orchestration.submit import JobSpec, follow, forwarded_env, job_client, job_config_path, submit_job

    _load(config, set_)  # a bad config fails here, before anything is uploaded
    wd = None if no_upload else working_dir
    try:
        spec = JobSpec(config=job_config_path(config, wd), command=command, overrides=tuple(set_ or ()),
                       working_dir=wd.resolve() if wd else None, pip=tuple(pip or ()), env=forwarded_env(env))
        spec.entrypoint()
    except ValueError as e:
        console.print(f"[red]cannot submit:[/] {escape(str(e))}")
        raise typer.Exit(2)
    client = job_client(address)
    job_id = submit_job(client, spec)
    console.print(f"submitted [bold]{job_id}[/] to {client.get_address()}: {escape(spec.entrypoint())}")
    if not wait:
        console.print(f"follow it with: ray job logs --follow {job_id} --address {client.get_address()}")
        return
    try:
        status = follow(client, job_id, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    except KeyboardInterrupt:
        console.print(f"\nstopped following; the job goes on (ray job stop {job_id} to stop it)")
        raise typer.Exit(130)
    console.print(f"job {job_id}: [{'green' if status == 'SUCCEEDED' else 'red'}]{status}[/]")
    raise typer.Exit(0 if status == "SUCCEEDED" else 1)


def _print_stage_graph(cfg) -> None:
    from latentforge.orchestration.cluster import local_cpus
    from latentforge.pipelines.curate import pool_cpus, stage_graph
    from latentforge.pipelines.stage import TASK_BATCH_ROWS

    cur = cfg.curation
    # Sized for the local Ray this config starts; on a cluster CPU pools grow to its CPUs.
    cpus = int(pool_cpus(local_cpus(cfg.ray), local=True))
    table = Table(title=f"curation {cur.name}: {cur.input_dir} -> {cur.output_dir}",
                  caption=f"one row per Ray Data map; CPU pools sized for this machine's {cpus} cores; task maps "
                          f"take batches of up to {TASK_BATCH_ROWS} rows when the job has inputs enough for "
                          f"4 tasks per CPU; shard tars written by: {_shard_writer(cur.shard_writes)}"
                          + (f"; duplicates of a representative the stages after dedup filter go through them "
                             f"again, up to {cur.dedup.readmit_rounds} rounds" if cur.dedup.readmit_rounds else ""))
    for column in ("map", "stages", "runs as", "num_cpus", "num_gpus", "batch_size", "pool"):
        table.add_column(column)
    for row in stage_graph(cur, cpus):
        runs_as = "actors" if row["actors"] else ("driver" if not row["stages"] else "tasks")
        table.add_row(str(len(table.rows) + 1), "\n".join(row["stages"]) or row["stage"], runs_as,
                      *(f"{row[c]:g}" for c in ("num_cpus", "num_gpus", "batch_size")),
                      str(row["pool"]) if row["actors"] else "-")
    console.print(table)


def _shard_writer(mode: str) -> str:
    return {"workers": "the last map's workers", "driver": "the driver",
            "auto": "the last map's workers when the output is a URI, else the driver"}[mode]


def _execute(cfg, *, do_curate: bool, do_train: bool, address: str | None = None) -> None:
    from latentforge.orchestration.cluster import configure_ray_data, connect_ray
    from latentforge.orchestration.run import run_all

    info = connect_ray(cfg.ray, address=address)
    configure_ray_data()
    console.print(f"Ray: {info['address']} ({info['cpus']:.0f} CPUs)")
    summary = run_all(cfg, do_curate=do_curate, do_train=do_train)
    _print_summary(cfg, summary)


def ui_hint(uri: str, workdir: Path, experiment_id: str | None) -> str:
    """How to browse the runs in the store `uri` (the one this invocation logged to)."""
    from latentforge.orchestration.tracking import default_tracking_uri

    page = f"#/experiments/{experiment_id}/runs"
    if uri.startswith(("http://", "https://")):  # a tracking server: already serving its UI
        return f"browse {uri.rstrip('/')}/{page}"
    if uri == default_tracking_uri(workdir):
        command = f"latentforge ui --workdir {shlex.quote(str(workdir))}"
    elif uri.startswith(("sqlite:", "postgresql:", "postgresql+", "mysql:", "mysql+")):  # what `ui` serves
        command = f"latentforge ui --workdir {shlex.quote(str(workdir))} --backend-store-uri {shlex.quote(uri)}"
    elif uri.startswith("databricks"):
        return f"the experiment in your Databricks workspace ({uri})"
    else:  # a file store (or any other): MLflow's own UI serves it
        command = f"mlflow ui --backend-store-uri {shlex.quote(uri)}"
    return f"{command}, then browse http://127.0.0.1:5000/{page}"


def _print_summary(cfg, summary) -> None:
    """Where the run put things, one `name  value` line each. Not a table: a table on an 80-column terminal (or in
    a log, where rich assumes 80) cut the paths short with an ellipsis, and the paths are what people copy."""
    from latentforge.orchestration.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking.uri, cfg.workdir)
    rows = [("dataset", str(path)) for path in summary.dataset_dirs]
    rows += [(f"weights ({name})", str(path)) for name, path in summary.exports.items()]
    rows += [(f"checkpoint ({name})", str(path)) for name, path in summary.checkpoints.items()]
    rows += [("MLflow store", uri), ("MLflow parent run", str(summary.parent_run_id))]
    if summary.registered:
        rows.append(("registered model", f"{summary.registered[0]} v{summary.registered[1]}"))
    rows.append(("open the UI", ui_hint(uri, cfg.workdir, summary.experiment_id)))
    if summary.exports:
        last = shlex.quote(str(list(summary.exports.values())[-1]))
        rows.append(("try a prompt", f'latentforge generate {last} -p "a red circle" --out generated'))
    width = max(len(name) for name, _ in rows)
    console.print("[bold]latentforge: where things are[/bold]")
    for name, value in rows:  # soft_wrap: a long value stays one line (the terminal wraps it, a copy gets it whole)
        console.print(f"  {escape(name.ljust(width))}  {escape(value)}", soft_wrap=True, highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
