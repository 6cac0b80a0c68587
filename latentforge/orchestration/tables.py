"""What a curation run shows: the reasons samples were left out and the time per stage (terminal tables), and
readable copies of its tables for the MLflow UI."""
from __future__ import annotations

import tempfile
from pathlib import Path

from latentforge.orchestration.tracking import Tracker


def reasons_table(dataset_dir: Path, most: int = 12):
    """Why samples were left out (status, stage, reason: count, an example), most frequent first; the rest, and
    every sample, are in rejects.parquet and report.html beside the manifest."""
    from rich import box
    from rich.table import Table

    from latentforge.datasets.manifest import Dataset

    keys = ["status", "stage", "reason"]
    rejects = Dataset(dataset_dir).rejects().select([*keys, "relpath"])
    # Counted in Arrow, the first example of each in table order (no dict per rejected row).
    groups = rejects.group_by(keys, use_threads=False).aggregate([([], "count_all"), ("relpath", "first")])
    rows = sorted(groups.to_pylist(), key=lambda g: -g["count_all"])  # stable: ties keep their first appearance
    # No vertical rules: on an 80-column terminal (or a log) they took the example column's width.
    table = Table(title="left out, by reason", title_justify="left", caption="each one: rejects.parquet, report.html",
                  caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column in ("status", "stage", "reason", "samples"):  # kept whole on a narrow terminal; the example wraps
        table.add_column(column, justify="right" if column == "samples" else "left", no_wrap=True)
    table.add_column("e.g.", overflow="fold")
    for group in rows[:most]:
        table.add_row(*(group[k] for k in keys), str(group["count_all"]), group["relpath_first"])
    if len(rows) > most:
        rest = rows[most:]
        table.add_row("...", "", f"{len(rest)} more reason{'s' if len(rest) > 1 else ''}",
                      str(sum(g["count_all"] for g in rest)), "")
    return table


def stage_time_table(stage_seconds: dict[str, dict[str, float]]):
    """Where a curation job's time went, stage by stage (also logged to MLflow as stage_<name>_cpu_s / _wall_s)."""
    from rich.table import Table

    total = sum(s["cpu_s"] for s in stage_seconds.values()) or 1.0
    table = Table(title="time per stage (all workers)", title_justify="left")
    for column in ("stage", "CPU s", "share", "wall s"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for name, spent in stage_seconds.items():
        table.add_row(name, f"{spent['cpu_s']:.1f}", f"{spent['cpu_s'] / total:.0%}", f"{spent['wall_s']:.1f}")
    return table


def log_tables(tracker: Tracker, run_id: str, dataset_dir: Path) -> None:
    """Readable copies for the MLflow UI: rejects and a manifest summary as CSV."""
    from pyarrow import csv

    from latentforge.datasets.manifest import Dataset

    ds = Dataset(dataset_dir)
    with tempfile.TemporaryDirectory() as tmp:  # pyarrow writes them straight from the columns (no pandas copy)
        rejects = Path(tmp) / "rejects.csv"
        csv.write_csv(ds.rejects(), rejects)
        summary = Path(tmp) / "manifest_summary.csv"
        csv.write_csv(manifest_summary(ds.manifest()), summary)
        tracker.log_artifact(run_id, rejects, "dataset")
        tracker.log_artifact(run_id, summary, "dataset")


def manifest_summary(manifest):
    """Samples per (modality, bucket), sorted; rows without either are not counted."""
    import pyarrow.compute as pc

    keyed = manifest.select(["modality", "bucket", "id"]).filter(
        pc.is_valid(pc.field("modality")) & pc.is_valid(pc.field("bucket")))
    counts = keyed.group_by(["modality", "bucket"]).aggregate([("id", "count")])
    return counts.select(["modality", "bucket", "id_count"]).rename_columns(["modality", "bucket", "samples"]) \
        .sort_by([("modality", "ascending"), ("bucket", "ascending")])
