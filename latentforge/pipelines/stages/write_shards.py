"""Write each shard group's kept samples into WebDataset tars with stable names; return metadata rows.

A group holds at most `samples_per_shard` inputs (assigned at discovery, or kept from the finished groups on a
rerun: resume.regroup; so names are stable across runs); it is split into parts when it would exceed `max_shard_mb`.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from latentforge.datasets import storage
from latentforge.datasets.shards import LatentShardWriter, load_npy, npy_bytes, sha256_file
from latentforge.pipelines.meta import HEAVY
from latentforge.pipelines.resume import marker_path, write_marker
from latentforge.pipelines.stage import TIMING_COLUMN, num_rows, rows_of, with_timing

WRITTEN = "group_written"  # set by write_finished_groups: the row's group is in its tars, its heavy columns empty
META_KEYS = ("id", "relpath", "modality", "width", "height", "num_frames", "fps", "duration_s", "sample_rate",
             "bucket")


def shard_name(group: int, part: int) -> str:
    return f"shard-{int(group):06d}-{part:02d}.tar"


def _meta(row: dict) -> dict:
    return {k: (row[k].item() if isinstance(row[k], np.generic) else row[k]) for k in META_KEYS}


def _members(row: dict) -> dict[str, bytes]:
    return {
        "latent.npy": row["latent"],
        # fp16 in transit through Ray; stored as float32 like the other members.
        "text.npy": npy_bytes(load_npy(row["text_emb"]).astype(np.float32)),
        "text_mask.npy": row["text_mask"],
        "caption.txt": str(row["caption"]).encode("utf-8"),
        "meta.json": json.dumps(_meta(row), sort_keys=True).encode("utf-8"),
    } | ({"repa.npy": row["repa"]} if len(row.get("repa", b"")) else {})  # float16 (N, D) from EncodeRepa


def write_parts(kept: list[dict], shard_dir: Path, max_bytes: int) -> dict[str, tuple[str, str]]:
    """Write `kept` (one group, id order) into as many parts as `max_bytes` needs: id -> (shard, sha256)."""
    placed: dict[str, str] = {}
    part, size, writer = 0, 0, None
    for row in kept:
        members = _members(row)
        nbytes = sum(len(v) for v in members.values()) + 512 * (len(members) + 1)  # tar headers
        if writer is not None and size + nbytes > max_bytes:
            writer.close()
            part, size, writer = part + 1, 0, None
        if writer is None:
            writer = LatentShardWriter(shard_dir / shard_name(row["shard"], part))
        writer.write(row["id"], members)
        placed[row["id"]] = writer.path.name
        size += nbytes
    if writer is not None:
        writer.close()
    digests = {name: sha256_file(shard_dir / name) for name in set(placed.values())}
    return {key: (name, digests[name]) for key, name in placed.items()}


def write_shard_group(batch: dict, shard_dir: str, max_bytes: int = 256 * 2**20,
                      config_hash: str | None = None) -> dict:
    """`groupby("shard").map_groups(write_shard_group, ...)`: this group's tars, and its rows minus latents.

    With `config_hash`, a done-marker follows the tars, so a rerun of the job can skip this group.
    `shard_dir` may be a URI (s3://...): the group is then written to local scratch and uploaded (see publish).
    """
    remote = storage.is_remote(shard_dir)
    local = Path(tempfile.mkdtemp(prefix="lf-group-", dir=storage.scratch_dir())) if remote else Path(shard_dir)
    try:
        rows = sorted(rows_of(batch), key=lambda r: r["id"])
        placed = write_parts([r for r in rows if r["status"] == "ok"], local, max_bytes)
        out = {k: v for k, v in batch.items() if k not in HEAVY}
        out["shard_name"] = np.array([placed.get(i, ("", ""))[0] for i in batch["id"]], dtype=object)
        out["shard_sha256"] = np.array([placed.get(i, ("", ""))[1] for i in batch["id"]], dtype=object)
        group = int(batch["shard"][0])
        if config_hash is not None:
            write_marker(local, group, rows_of(out), config_hash)
        if remote:
            publish(local, str(shard_dir), sorted({name for name, _ in placed.values()}),
                    group if config_hash is not None else None)
        return out
    finally:
        if remote:
            shutil.rmtree(local, ignore_errors=True)


def publish(local: Path, shard_dir: str, tars: list[str], group: int | None) -> None:
    """Upload a group written to local scratch: its tars first, its done-marker last. An object store shows
    an object only once its upload completes, so a crash leaves whole tars without a marker (redone on resume,
    as locally), never a marker naming missing or partial tars."""
    for name in tars:
        storage.upload(local / name, storage.join(shard_dir, name))
    if group is not None:
        marker = marker_path(local, group)
        storage.upload(marker, storage.join(shard_dir, marker.relative_to(local).as_posix()))


def finished_groups(batch: dict, group_inputs: dict[int, int]) -> dict[int, list[int]]:
    """The shard groups whose every row is in `batch`: group -> row indices. A group is finished when each of
    its `group_inputs[group]` inputs has sent all its `source_rows` rows (its clips, or one row)."""
    rows: dict[int, list[int]] = {}
    sent: dict[int, dict[str, list[int]]] = {}  # group -> source id -> [rows here, rows it makes]
    for i, (group, source, total) in enumerate(zip(batch["shard"], batch["source_id"], batch["source_rows"])):
        rows.setdefault(int(group), []).append(i)
        count = sent.setdefault(int(group), {}).setdefault(str(source), [0, int(total)])
        count[0] += 1
    return {g: idx for g, idx in rows.items()
            if len(sent[g]) == group_inputs.get(g, -1) and all(n == total for n, total in sent[g].values())}


def write_finished_groups(batch: dict, group_inputs: dict[int, int], shard_dir: str, max_bytes: int,
                          config_hash: str | None = None) -> dict:
    """Write the groups `batch` holds whole (`finished_groups`) where the batch is, and return every row:
    a written row with its shard name and digest, empty heavy columns and WRITTEN true; any other row as it
    came (WRITTEN false), for the driver to write once the rest of its group has come in.

    The last stage map calls this on each whole block it finished, so on a cluster the latents go from the
    worker to the shard directory and never through the driver. A retried task rewrites the same tars and
    marker (the bytes are deterministic, and each file appears under its name only once complete).
    """
    cpu, wall = time.process_time(), time.perf_counter()
    n = num_rows(batch)
    out = dict(batch)
    out["shard_name"] = np.array([""] * n, dtype=object)
    out["shard_sha256"] = np.array([""] * n, dtype=object)
    out[WRITTEN] = np.zeros(n, dtype=bool)
    heavy = [k for k in HEAVY if k in out]
    for k in heavy:
        out[k] = out[k].astype(object)  # a copy: written rows' entries are emptied below
    for group, idx in finished_groups(batch, group_inputs).items():
        part = {k: v[idx] for k, v in batch.items() if k != TIMING_COLUMN}  # the marker holds no timings
        meta = write_shard_group(part, shard_dir, max_bytes, config_hash)
        for j, i in enumerate(idx):
            out["shard_name"][i], out["shard_sha256"][i] = meta["shard_name"][j], meta["shard_sha256"][j]
            for k in heavy:
                out[k][i] = b""
        out[WRITTEN][idx] = True
    return with_timing(out, {"write_shards": (time.process_time() - cpu, time.perf_counter() - wall)})
