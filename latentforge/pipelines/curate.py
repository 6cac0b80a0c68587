"""The curation job: discover -> probe -> filter -> split clips -> hash + dedup -> score -> caption -> encode ->
shards + manifest + rejects + card."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from latentforge.datasets import manifest as mf
from latentforge.datasets import storage
from latentforge.datasets.media import usable_cores
from latentforge.pipelines.card import COLUMNS as CARD_COLUMNS
from latentforge.pipelines.card import build_card, config_hash
from latentforge.pipelines import meta as mt
from latentforge.pipelines.config import CurationConfig
from latentforge.pipelines.discover import as_inputs, discover_table, group_sizes
from latentforge.pipelines.duplicates import HASH_COLUMNS, Marks, duplicates, hash_table, mark, voters
from latentforge.pipelines.readmit import earlier_groups, readmit
from latentforge.pipelines.resume import discard_group, done_groups, regroup, sweep
from latentforge.pipelines.shard_writes import write_groups, writes_in_workers
from latentforge.pipelines.stage import (
    Segment,
    Stage,
    apply_segment,
    cpu_scale,
    segments,
)
from latentforge.pipelines.stages.caption_audio import CaptionAudio
from latentforge.pipelines.stages.caption_prep import CaptionPrep
from latentforge.pipelines.stages.caption_select import CaptionSelect
from latentforge.pipelines.stages.caption_sidecar import CaptionSidecar
from latentforge.pipelines.stages.caption_vlm import CaptionVLM
from latentforge.pipelines.stages.dedup import ContentHash
from latentforge.pipelines.stages.encode_latents import EncodeLatents, parse_shape
from latentforge.pipelines.stages.encode_repa import EncodeRepa
from latentforge.pipelines.stages.encode_text import EncodeText
from latentforge.pipelines.stages.filter_audio import FilterAudioQuality
from latentforge.pipelines.stages.filter_basic import FilterBasic
from latentforge.pipelines.stages.filter_motion import FilterMotion
from latentforge.pipelines.stages.filter_sharpness import FilterSharpness
from latentforge.pipelines.stages.filter_text_area import FilterTextArea
from latentforge.pipelines.stages.probe_media import ProbeMedia
from latentforge.pipelines.stages.score_aesthetic import ScoreAesthetic
from latentforge.pipelines.stages.score_nsfw import ScoreNsfw
from latentforge.pipelines.stages.split_clips import SplitClips
from latentforge.pipelines.stages.write_shards import write_finished_groups

# Before the global dedup pass (the pipeline materialises here), and after it.
SCAN_STAGES: tuple[type[Stage], ...] = (ProbeMedia, FilterBasic, CaptionSidecar, SplitClips, ContentHash)
STAGES: tuple[type[Stage], ...] = (FilterSharpness, FilterMotion, FilterTextArea, ScoreAesthetic, ScoreNsfw,
                                   FilterAudioQuality, CaptionPrep, CaptionVLM, CaptionAudio, CaptionSelect,
                                   EncodeLatents, EncodeRepa,
                                   EncodeText)


@dataclass
class CurationResult:
    dataset_dir: Path | str  # a URI when the dataset was written to an object store
    inputs: int
    kept: int
    rejected: int
    filtered: int
    reasons: dict[str, int]
    by_modality: dict[str, int]
    card: dict = field(repr=False, default_factory=dict)

    samples: int = 0  # rows out: one per input, or one per clip of a split video
    readmitted: int = 0  # duplicates curated again after a later stage filtered their representative
    local_dir: Path | None = None  # a remote dataset's manifest, rejects and card, as written before upload
    # Wall seconds per phase: scan (probe .. hashes, materialised), dedup (driver), first_row (stage actors
    # starting and loading models, up to the first finished row), stages (the rest of the stream and the
    # shard writes), tables (manifest, rejects, card).
    seconds: dict[str, float] = field(default_factory=dict)
    # Shard groups written by the last map's workers and by the driver (see CurationConfig.shard_writes).
    groups_written: dict[str, int] = field(default_factory=dict)
    # The job's own shard groups: kept as an earlier run finished them, redone (an input removed or changed since),
    # new (the rest: a first run's groups, or those of inputs no finished group holds).
    groups: dict[str, int] = field(default_factory=dict)
    # Per stage, summed over every worker: {"cpu_s": process CPU seconds, "wall_s": wall seconds}, in the order
    # the stages ran. A stage's CPU includes its libraries' threads; wall is what the batches waited on it.
    stage_seconds: dict[str, dict[str, float]] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        base = {"inputs": self.inputs, "samples": self.samples, "kept": self.kept, "rejected": self.rejected,
                "filtered": self.filtered, "readmitted": self.readmitted}
        base.update({f"seconds_{phase}": s for phase, s in self.seconds.items()})
        base.update({f"groups_written_{where}": n for where, n in self.groups_written.items()})
        base.update({f"groups_{how}": n for how, n in self.groups.items()})
        for stage, spent in self.stage_seconds.items():
            base.update({f"stage_{stage}_{kind}": s for kind, s in spent.items()})
        base.update({f"kept_{m}": n for m, n in self.by_modality.items()})
        base.update({f"reason_{r}": n for r, n in self.reasons.items()})
        return {k: float(v) for k, v in base.items()}


def active_stages(stages: tuple[type[Stage], ...], cfg: CurationConfig) -> tuple[type[Stage], ...]:
    """The stages this config runs: a stage with an `enabled(cfg)` classmethod (the captioners) is left out of the
    chain when it says no, so an unused model costs no actor pool at all."""
    return tuple(s for s in stages if getattr(s, "enabled", lambda _cfg: True)(cfg))


def stage_graph(cfg: CurationConfig, cluster_cpus: float | None = None) -> list[dict]:
    """The Ray Data maps, in order, with each one's stages and resources, as they will be handed to Ray Data
    (`cluster_cpus`: size fused CPU pools for a cluster of that many CPUs)."""
    def rows(parts: list[Segment]) -> list[dict]:
        return [{"stage": p.name, "stages": [s.name for s in p.stages], "actors": p.holds_state,
                 **p.resources.model_dump()} for p in parts]

    dedup_row = {"stage": "dedup (global, on the driver)", "stages": [], "actors": False, "num_cpus": 0,
                 "num_gpus": 0, "batch_size": 0, "pool": 0}
    return (rows(segments(SCAN_STAGES, cfg, cluster_cpus)) + [dedup_row]
            + rows(segments(active_stages(STAGES, cfg), cfg, cluster_cpus)))


def scan(rows: pa.Table | list[dict], cfg: CurationConfig, whole_groups: bool = False):
    """Probe, basic filters, clip splitting and content hashes, materialised for the global dedup pass
    (`whole_groups`: every block holds whole shard groups, see input_dataset)."""
    return map_stages(input_dataset(rows, cfg, whole_groups), SCAN_STAGES, cfg, storage.ray_remote_args(cfg.input_dir),
                      rows=len(rows)).materialize()


def input_dataset(rows: pa.Table | list[dict], cfg: CurationConfig, whole_groups: bool = False):
    """The discovered rows (discover_table's) as a Ray Dataset of one block per task of the scan's first map,
    each a slice of the table (from_items would make a dict of every row first).

    Ray Data bundles blocks into a task until they hold its batch, and every block is an object the driver puts
    and the executor and its stats actor track: blocks of 8 rows cost the driver 5.8 s for 23,056 inputs
    before the first task ran, with the other core idle, against 0.5 s for blocks of 128. Each block holds at
    least a batch (rows // batch blocks): one row short, and every task would take two blocks.

    `whole_groups`: blocks end at shard-group boundaries (whole groups until a block holds a batch). A task
    takes whole blocks and returns its rows as one block, so every block after the scan holds whole groups
    too: what lets the last stage map write the shards itself (write_finished_groups)."""
    import ray.data

    table = as_inputs(rows)
    n = table.num_rows
    per_block = plan(SCAN_STAGES, cfg, n)[0][0].resources.batch_size
    if not whole_groups:
        blocks = max(1, n // per_block)
        starts = [n * b // blocks for b in range(blocks)]  # as even as from_items(override_num_blocks) makes them
    else:
        starts = [0]
        shard = table["shard"].to_numpy()
        for i in (np.flatnonzero(shard[1:] != shard[:-1]) + 1).tolist():  # where a group begins
            if i - starts[-1] >= per_block:
                starts.append(i)
    return ray.data.from_arrow([table.slice(a, b - a) for a, b in zip(starts, starts[1:] + [n])])


def plan(stages: tuple[type[Stage], ...], cfg: CurationConfig, rows: int | None = None) -> tuple[list[Segment], float]:
    """The stages' maps as they run on the connected cluster for `rows` inputs, and the cluster's CPUs."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1.0)
    return segments(stages, cfg, pool_cpus(cpus, local=ray_is_this_machine()), rows=rows), cpus


def map_stages(ds, stages: tuple[type[Stage], ...], cfg: CurationConfig, remote: dict,
               prelude: tuple[Callable, dict] | None = None, rows: int | None = None,
               postlude: tuple[Callable, dict] | None = None):
    """The stages as Ray Data maps (fused into chains as `cfg.fusion` says), sized to the connected cluster
    and to `rows` (how many rows will come); `prelude` runs in the first map's workers, `postlude` in the
    last map's (see apply_segment). With a postlude every map takes whole blocks."""
    parts, cpus = plan(stages, cfg, rows)
    factor = cpu_scale(parts, cpus)
    if factor < 1.0:
        logging.getLogger(__name__).warning(
            "stage actor pools ask for more CPUs than the cluster has; scaling their CPU requests by %.2f "
            "(set curation.resources / curation.fusion.pool to choose yourself)", factor)
    whole = postlude is not None
    if not parts:
        for step in (prelude, postlude):
            if step is not None:
                ds = ds.map_batches(step[0], fn_kwargs=step[1], batch_format="numpy",
                                    **({"batch_size": None} if whole else {}), **remote)
        return ds
    for i, part in enumerate(parts):
        ds = apply_segment(ds, part, cfg, factor, remote, prelude if i == 0 else None,
                           postlude if i == len(parts) - 1 else None, whole_blocks=whole)
    return ds


def ray_is_this_machine() -> bool:
    """Whether the connected cluster is one node on this machine (a local Ray)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return len(nodes) == 1 and nodes[0].get("NodeManagerAddress") == ray.util.get_node_ip_address()


def pool_cpus(cluster_cpus: float, local: bool) -> float:
    """The CPUs that CPU actor pools are sized to. A local Ray is given more logical CPUs than cores (so Ray
    Data and Ray Train share a small machine); there pools are sized to the cores, since actors beyond them
    only take turns on the same cores."""
    return min(cluster_cpus, usable_cores()) if local else cluster_cpus


def dedup(ds, cfg: CurationConfig, done: pa.Table | list[dict] = (), settled: bool = False) -> tuple[Callable, dict]:
    """Exact and near duplicates across the whole corpus (needs every hash at once, so it runs here).
    Returns the marking as (function, keywords), for the first map after it to run on its batches.

    `done`: metadata rows of groups finished by an earlier run; they vote as they did then, so a resumed job
    picks the same representatives as an uninterrupted one. `settled` (a rerun on inputs added or removed
    since, resume.regroup): the finished groups are not redone, so their decisions stand: their representatives
    come first (a new input that duplicates one becomes its duplicate even where dedup would prefer it, as for a
    higher resolution; preferring it would keep both), and their duplicates do not vote (one preferred over a
    redone group's input would take that input out while staying out itself).

    The hash columns come to the driver as Arrow tables (Ray Data's blocks), not as a dict per row.
    """
    table = pa.concat_tables([hash_columns(ds), voters(mt.as_table(done), {s.name for s in STAGES}, settled)],
                             promote_options="permissive")
    return mark, {"marks": Marks.of(table, duplicates(table, cfg.dedup))}


def hash_columns(ds) -> pa.Table:
    """The scanned dataset's hash columns as one Arrow table (each block fetched as it is)."""
    import ray

    parts = [t.select(HASH_COLUMNS) for t in ray.get(ds.select_columns(HASH_COLUMNS).to_arrow_refs())]
    parts = [t for t in parts if t.num_rows]
    if not parts:
        return hash_table([]).select(HASH_COLUMNS)
    return pa.concat_tables(parts, promote_options="permissive")


def build_pipeline(rows: pa.Table | list[dict], cfg: CurationConfig, shard_dir: Path | str,
                   done: pa.Table | list[dict] = (), seconds: dict[str, float] | None = None,
                   writer_args: dict | None = None, settled: bool = False):
    """The dataset of finished rows, not yet executed: scan, dedup (`done`, `settled`: see dedup), then the
    stages. `seconds` gets the wall time of the scan and of the dedup pass. `writer_args` (write_shard_group's
    keywords): the last map writes the groups it holds whole (write_finished_groups), whose rows then come
    without latents; without them every row keeps its latents."""
    seconds = {} if seconds is None else seconds
    start = time.perf_counter()
    ds = scan(rows, cfg, whole_groups=writer_args is not None)
    seconds["scan"] = time.perf_counter() - start
    marking = dedup(ds, cfg, done, settled)
    seconds["dedup"] = time.perf_counter() - start - seconds["scan"]
    writer = (write_finished_groups, {"group_inputs": dict(group_sizes(rows)),
                                      **writer_args}) if writer_args is not None else None
    return map_stages(ds, active_stages(STAGES, cfg), cfg, storage.ray_remote_args(cfg.input_dir, shard_dir), marking,
                      rows=ds.count(), postlude=writer)


def shard_writer_args(cfg: CurationConfig, shard_dir: Path | str) -> dict:
    return {"shard_dir": str(shard_dir), "max_bytes": int(cfg.max_shard_mb * 2**20), "config_hash": config_hash(cfg)}


def run_curation(cfg: CurationConfig, dataset_dir: Path | str, rows: pa.Table | list[dict] | None = None
                 ) -> CurationResult:
    """Run the job on the connected Ray cluster and write the dataset to `dataset_dir` (a directory or a URI;
    `cfg.input_dir` may be a URI too). `rows`: the inputs as `discover_table` listed them for this config, when
    the caller already has them (else they are listed here)."""
    dataset_dir = storage.as_location(dataset_dir)
    shard_dir = storage.join(dataset_dir, mf.SHARDS)
    if not storage.is_remote(shard_dir):
        shard_dir.mkdir(parents=True, exist_ok=True)
    rows = discover_table(cfg.input_dir, cfg.samples_per_shard) if rows is None else as_inputs(rows)
    if not rows.num_rows:
        raise ValueError(f"no input files under {cfg.input_dir}")
    done = done_groups(shard_dir, config_hash(cfg), cfg.resume_check)  # resume: groups an earlier run finished
    readmitted_done = earlier_groups(done)  # readmission's groups (readmit.py)
    # ... unless their inputs changed since (removed, or changed in place): stale
    rows, kept_groups, stale = regroup(rows, done, set(readmitted_done), cfg.samples_per_shard)
    for group in stale:
        discard_group(shard_dir, group, done.pop(group))
    log = logging.getLogger(__name__)
    if stale:
        log.warning("resuming: %d finished shard groups redone because their inputs changed since they were written "
                    "(an input removed, or a file or caption changed in place): %s", len(stale),
                    ", ".join(map(str, stale[:10])) + (" ..." if len(stale) > 10 else ""))
    finished = done.rows()
    pending = rows.filter(pc.invert(pc.is_in(rows["shard"], value_set=pa.array(list(done), pa.int64()))))
    new = sorted(set(pc.unique(pending["shard"]).to_pylist()) - set(stale))
    if kept_groups and new:
        log.warning("resuming: inputs were added or removed since the finished shard groups were written; those keep "
                    "their inputs, and %d inputs no finished group holds go to shard groups %d-%d",
                    pc.sum(pc.is_in(pending["shard"], value_set=pa.array(new, pa.int64()))).as_py(), new[0], new[-1])
    if done:
        log.warning("resuming: %d of %d shard groups already done, %d inputs to go",
                    len(done), pc.count_distinct(rows["shard"]).as_py(), pending.num_rows)
    seconds: dict[str, float] = {}
    stage_seconds: dict[str, list[float]] = {}
    written: dict[str, int] = {}
    meta = mt.from_rows([])
    if pending.num_rows:
        writer_args = shard_writer_args(cfg, shard_dir)
        ds = build_pipeline(pending, cfg, shard_dir, finished, seconds,
                            writer_args if writes_in_workers(cfg, shard_dir) else None, settled=kept_groups)
        meta = write_groups(ds, pending, writer_args, seconds=seconds, stage_seconds=stage_seconds, written=written)
    start = time.perf_counter()

    def curate_again(todo: list[dict]) -> pa.Table:
        import ray.data

        ds = map_stages(ray.data.from_items(todo), active_stages(STAGES, cfg), cfg,
                        storage.ray_remote_args(cfg.input_dir, shard_dir), rows=len(todo))
        return write_groups(ds, todo, shard_writer_args(cfg, shard_dir), stage_seconds=stage_seconds, by_rows=True)

    first_group = 1 + pc.max(rows["shard"]).as_py()  # readmission's groups come after the job's own
    meta, readmitted = readmit(mt.concat([finished, meta], combine=False), cfg.dedup,
                               {s.name for s in STAGES}, first_group, cfg.samples_per_shard, readmitted_done,
                               curate_again, lambda g, group_rows: discard_group(shard_dir, g, group_rows))
    seconds["readmit"] = time.perf_counter() - start
    stray = sweep(shard_dir, set(pc.unique(mt.strings(meta, "shard_name")).to_pylist()) - {""})
    if stray:
        log.warning("removed %d shard tars no sample names (written by a stopped job before its group's marker): %s",
                    len(stray), ", ".join(stray[:10]) + (" ..." if len(stray) > 10 else ""))
    start = time.perf_counter()
    result = write_dataset(meta, rows, cfg, dataset_dir)
    result.readmitted = readmitted
    result.seconds = {**seconds, "tables": time.perf_counter() - start}
    result.groups_written = written
    result.groups = {"kept": len(done), "redone": len(stale), "new": len(new)}
    result.stage_seconds = {name: {"cpu_s": cpu, "wall_s": wall} for name, (cpu, wall) in stage_seconds.items()}
    log.info("curation phases (wall s): %s", ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()))
    log.info("shard groups written: %s", ", ".join(f"{n} by the {k}" for k, n in written.items()) or "none")
    log.info("curation stages (CPU s, all workers): %s",
             ", ".join(f"{k} {v['cpu_s']:.1f}" for k, v in result.stage_seconds.items()))
    return result


def write_dataset(meta: pa.Table | list[dict], rows: pa.Table | list[dict], cfg: CurationConfig,
                  dataset_dir: Path | str) -> CurationResult:
    """The manifest (kept rows, by id), the rejects table and the card from the job's metadata rows (meta.py),
    once every input is accounted for."""
    meta = mt.as_table(meta)
    inputs = as_inputs(rows)["id"].cast(pa.string()).combine_chunks()
    sources = pc.unique(mt.strings(meta, "source_id"))
    lost = inputs.filter(pc.invert(pc.is_in(inputs, value_set=sources)))
    if len(lost):  # every input must come out as manifest or rejects rows (one per clip when split)
        raise RuntimeError(f"curation lost track of {len(lost)} inputs, e.g. {sorted(lost.to_pylist())[:3]}")
    strays = sources.filter(pc.invert(pc.is_in(sources, value_set=inputs)))
    if len(strays):  # ... and nothing else: rows of inputs no longer under the root (a stale resume) are refused
        raise RuntimeError(f"curation holds rows of {len(strays)} inputs that are not inputs of this job, "
                           f"e.g. {sorted(strays.to_pylist())[:3]}")
    ids = mt.strings(meta, "id")
    if pc.count_distinct(ids).as_py() != meta.num_rows:
        raise RuntimeError("curation produced duplicate sample ids")
    status = mt.strings(meta, "status")
    # In id order: float sums (latent statistics) then do not depend on the order Ray returned the rows in.
    # The tables are written a row group at a time and the card reads only its columns: no copy of every row.
    order = pc.sort_indices(ids)
    ok = pc.equal(status, "ok").take(order)
    kept_at, others_at = order.filter(ok).combine_chunks(), order.filter(pc.invert(ok)).combine_chunks()
    local = staging_dir(dataset_dir) if storage.is_remote(dataset_dir) else dataset_dir
    mf.write_rows(meta, kept_at, mf.MANIFEST_SCHEMA, local / mf.MANIFEST, prepare=_as_kept)
    mf.write_rows(meta, others_at, mf.REJECTS_SCHEMA, local / mf.REJECTS)
    kept = meta.select([c for c in CARD_COLUMNS if c in meta.column_names]).take(kept_at)
    card = build_card(kept, cfg, dataset_dir)
    (local / mf.CARD).write_text(json.dumps(card, indent=2, sort_keys=True))
    if local != dataset_dir:  # the card last: a dataset with a card is complete
        for name in (mf.MANIFEST, mf.REJECTS, mf.CARD):
            storage.upload(local / name, storage.join(dataset_dir, name))
    counts = mt.counts(status)
    return CurationResult(
        dataset_dir=dataset_dir, local_dir=local if local != dataset_dir else None, inputs=len(rows),
        samples=meta.num_rows, kept=kept.num_rows, rejected=counts.get("rejected", 0),
        filtered=counts.get("filtered", 0), reasons=mt.counts(mt.strings(meta, "reason").take(others_at)),
        by_modality=mt.counts(mt.strings(kept, "modality")), card=card,
    )


def _as_kept(rows: pa.Table) -> pa.Table:
    """Kept rows as the manifest holds them: `shard` names the tar (the group number before), `latent_shape`
    a list of ints."""
    return mt.with_column(mt.with_column(rows, "shard", mt.strings(rows, "shard_name")), "latent_shape", _shapes(rows))


def _shapes(kept: pa.Table) -> pa.ChunkedArray:
    """The kept rows' `latent_shape` (text such as "[4, 32, 32]", as the encode stage writes it) as lists of ints,
    each distinct value parsed once."""
    if "latent_shape" not in kept.column_names or not kept.num_rows:
        return pa.chunked_array([pa.array([[]] * kept.num_rows, pa.list_(pa.int32()))])
    column = kept["latent_shape"]
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        return column.cast(pa.list_(pa.int32()))
    encoded = mt.plain(column).cast(pa.string()).combine_chunks().dictionary_encode()
    shapes = pa.array([parse_shape(v) for v in encoded.dictionary.to_pylist()], pa.list_(pa.int32()))
    return pa.chunked_array([shapes.take(encoded.indices)])


def staging_dir(dataset_dir: str) -> Path:
    """Where a remote dataset's tables and card are written before upload (kept for the report and MLflow)."""
    path = storage.cache_dir() / "datasets" / hashlib.sha1(dataset_dir.encode()).hexdigest()[:16]
    path.mkdir(parents=True, exist_ok=True)
    return path
