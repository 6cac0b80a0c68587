"""Curation resume: a shard group is done once its tars and a done-marker exist; a rerun redoes only the rest.

The marker (`shards/_done/group-GGGGGG.json`) is written after the group's tars, holds the group's metadata
rows (everything but latents) and the config hash, and is trusted only when every tar it names still has its
recorded sha256. Shards are deterministic given inputs and config, so a resumed job writes the same dataset
as an uninterrupted one.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np

from latentforge.datasets import storage
from latentforge.datasets.shards import partial_path

DONE_DIR = "_done"
BYTES_TAG = "__b64__"


def marker_path(shard_dir: Path, group: int) -> Path:
    return Path(shard_dir) / DONE_DIR / f"group-{int(group):06d}.json"


def _plain(value):
    if isinstance(value, bytes):
        return {BYTES_TAG: base64.b64encode(value).decode()}
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _restore(value):
    if isinstance(value, dict) and BYTES_TAG in value:
        return base64.b64decode(value[BYTES_TAG])
    return value


def write_marker(shard_dir: Path, group: int, rows: list[dict], config_hash: str) -> None:
    """The group's marker, naming each tar with the sha256 its rows carry (`shard_sha256`, taken as the tar
    was written: not read back here)."""
    shards = {r["shard_name"]: r["shard_sha256"] for r in rows if r.get("shard_name")}
    body = {"config_hash": config_hash, "shards": dict(sorted(shards.items())),
            "rows": [{k: _plain(v) for k, v in r.items()} for r in rows]}
    path = marker_path(shard_dir, group)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    tmp.write_text(json.dumps(body))
    tmp.replace(path)


def done_groups(shard_dir: Path | str, config_hash: str) -> dict[int, list[dict]]:
    """Groups whose marker matches this config and whose tars are intact: group -> metadata rows.

    `shard_dir` may be a URI (s3://...); its tars are then hashed as they stream in."""
    out: dict[int, list[dict]] = {}
    markers = storage.join(shard_dir, DONE_DIR)
    for name in storage.list_files(markers):
        if "/" in name or not (name.startswith("group-") and name.endswith(".json")):
            continue
        try:
            body = json.loads(storage.read_text(storage.join(markers, name)))
        except ValueError:
            continue
        intact = all(storage.is_file(storage.join(shard_dir, s)) and storage.sha256(storage.join(shard_dir, s)) == h
                     for s, h in body["shards"].items())
        if body.get("config_hash") == config_hash and intact:
            out[int(name[len("group-"):-len(".json")])] = [{k: _restore(v) for k, v in r.items()}
                                                          for r in body["rows"]]
    return out
