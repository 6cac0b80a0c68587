"""Write each shard group's kept samples into WebDataset tars with stable names; return metadata rows.

A group holds at most `samples_per_shard` samples (assigned at discovery, so names are stable across runs);
it is split into parts when it would exceed `max_shard_mb`.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from latentforge.datasets import storage
from latentforge.datasets.shards import LatentShardWriter, load_npy, npy_bytes, sha256_file
from latentforge.pipelines.resume import marker_path, write_marker
from latentforge.pipelines.stage import rows_of

HEAVY = ("latent", "text_emb", "text_mask", "repa")
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
