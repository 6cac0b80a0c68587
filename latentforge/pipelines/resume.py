"""Curation resume: a shard group is done once its tars and a done-marker exist; a rerun redoes only the rest.

The marker (`shards/_done/group-GGGGGG.json`) is written after the group's tars, holds the group's metadata
rows (everything but latents), the config hash and each tar's sha256 and size, and is trusted only when every
tar it names is still there at its recorded size (or, with `resume_check: sha256`, hashes to its digest), and
only for the inputs it was written from. Discovery assigns groups by sorted index; while
that agrees with every finished group (a job stopped part-way and started again), the rerun keeps it, and,
shards being deterministic given inputs and config, writes the same dataset as an uninterrupted run. Once
inputs were added or removed since, it would not: one file that sorts first would shift every group after it.
Then the finished groups keep their inputs (`regroup`): a group that lost an input, or one of whose inputs or
captions changed in place (its size or modification time, recorded at discovery, differs), is redone under its
number with the inputs it still has (`stale_groups`, `discard_group`), and inputs no finished group holds go
to new groups numbered after every earlier one. Adding files therefore writes new shards and leaves the
finished ones byte for byte, so lineage that names them (training runs) still verifies. Groups whose rows say
`readmitted` are readmission's (readmit.py), which judges them by their rows' inputs and signatures.
"""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np

from latentforge.datasets import storage
from latentforge.datasets.shards import partial_path

DONE_DIR = "_done"
SHARD_TAR = re.compile(r"shard-\d{6,}-\d{2,}\.tar")  # write_shards.shard_name's names
BYTES_TAG = "__b64__"


def marker_name(group: int) -> str:
    return f"group-{int(group):06d}.json"


def marker_path(shard_dir: Path, group: int) -> Path:
    return Path(shard_dir) / DONE_DIR / marker_name(group)


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
    """The group's marker, naming each tar (in the local `shard_dir`) with the sha256 its rows carry
    (`shard_sha256`, taken as the tar was written: not read back here) and its size."""
    shards = {r["shard_name"]: r["shard_sha256"] for r in rows if r.get("shard_name")}
    body = {"config_hash": config_hash, "shards": dict(sorted(shards.items())),
            "sizes": {name: (Path(shard_dir) / name).stat().st_size for name in sorted(shards)},
            "rows": [{k: _plain(v) for k, v in r.items()} for r in rows]}
    path = marker_path(shard_dir, group)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    tmp.write_text(json.dumps(body))
    tmp.replace(path)


def done_groups(shard_dir: Path | str, config_hash: str, check: str = "size") -> dict[int, list[dict]]:
    """Groups whose marker matches this config and whose tars are intact: group -> metadata rows.

    `check` (CurationConfig.resume_check): "size", each tar the size its marker recorded, from one listing of
    `shard_dir` (a tar cut short, or rewritten at another size, is not trusted; markers written before sizes
    were recorded are checked by sha256); "sha256", each tar read back and hashed, as it streams in when
    `shard_dir` is a URI (s3://...): the whole dataset is read."""
    out: dict[int, list[dict]] = {}
    infos = storage.file_infos(shard_dir)  # every file's size, in one listing
    for path in sorted(infos):
        name = path[len(DONE_DIR) + 1:]
        if not (path.startswith(DONE_DIR + "/") and name.startswith("group-") and name.endswith(".json")
                and "/" not in name):
            continue
        try:
            body = json.loads(storage.read_text(storage.join(shard_dir, path)))
        except ValueError:
            continue
        sizes = body.get("sizes") if check == "size" else None

        def intact(tar: str, digest: str) -> bool:
            if tar not in infos:
                return False
            if sizes is not None:
                return infos[tar][0] == sizes.get(tar)
            return storage.sha256(storage.join(shard_dir, tar)) == digest

        if body.get("config_hash") == config_hash and all(intact(s, h) for s, h in body["shards"].items()):
            out[int(name[len("group-"):-len(".json")])] = [{k: _restore(v) for k, v in r.items()}
                                                          for r in body["rows"]]
    return out


def input_ids(rows: list[dict]) -> set[str]:
    """The inputs `rows` came from: each row's `source_id` (a clip's input; the row's own id when unsplit).
    Kept, filtered and rejected rows alike: every input is accounted for by one of them."""
    return {str(r.get("source_id") or r["id"]) for r in rows}


def stale_groups(done: dict[int, list[dict]], rows: list[dict]) -> list[int]:
    """The groups of `done` (done_groups) whose marker rows came from other inputs than the discovered `rows`
    now assign to the group (inputs added or removed since it was written), that no input is assigned to, or
    whose inputs or captions changed in place since (their `input_signature`, size and modification time,
    differs; markers written before signatures were recorded are judged by their inputs' ids alone)."""
    current: dict[int, set[str]] = {}
    signatures = {str(r["id"]): r.get("input_signature") for r in rows}
    for r in rows:
        current.setdefault(int(r["shard"]), set()).add(str(r["id"]))

    def changed(group_rows: list[dict]) -> bool:
        return any(r.get("input_signature") is not None
                   and signatures.get(str(r.get("source_id") or r["id"])) != r["input_signature"] for r in group_rows)

    return sorted(g for g, group_rows in done.items()
                  if input_ids(group_rows) != current.get(int(g), set()) or changed(group_rows))


def regroup(rows: list[dict], done: dict[int, list[dict]], taken: set[int], per_group: int) -> tuple[bool, list[int]]:
    """Assign `rows` (discovered: sorted by path, groups by index) to shard groups given the finished groups
    `done` (the job's own, by done_groups) and `taken` (other group numbers an earlier run used: readmission's).
    Sorts `rows` by group, then path. Returns whether the finished groups kept their inputs, and the stale ones
    (stale_groups, on the assignment made): none when discovery's assignment stands (it agrees with every
    finished group, and no number in `taken` is one of its groups).

    Kept: an input a finished group holds stays in that group (the first such group, by number); a finished group
    that lost an input or holds a changed one is then stale and redone under its number with what it still
    holds; the other inputs go, in path order, `per_group` at a time, to groups numbered from one past every
    number in `done` and `taken`.
    """
    kept = bool(stale_groups(done, rows)) or any(g <= int(rows[-1]["shard"]) for g in taken)
    if kept:
        present = {str(r["id"]) for r in rows}
        assigned: dict[str, int] = {}
        for g in sorted(done):
            for source in sorted(input_ids(done[g]) & present):
                assigned.setdefault(source, int(g))
        first = 1 + max([*map(int, done), *taken], default=-1)
        loose = [r for r in rows if str(r["id"]) not in assigned]
        for i, r in enumerate(loose):
            r["shard"] = first + i // per_group
        for r in rows:
            r["shard"] = assigned.get(str(r["id"]), r["shard"])
    rows.sort(key=lambda r: (int(r["shard"]), r["relpath"]))
    return kept, stale_groups(done, rows) if kept else []


def discard_group(shard_dir: Path | str, group: int, rows: list[dict]) -> None:
    """Remove a stale group's done-marker, then the tars its marker `rows` name, so neither survives into the
    dataset when the group is redone (a redone group may write fewer parts, or none). The marker goes first:
    a crash in between leaves tars without a marker, which a rerun redoes anyway."""
    storage.remove(storage.join(shard_dir, DONE_DIR, marker_name(group)))
    for name in sorted({str(r["shard_name"]) for r in rows if r.get("shard_name")}):
        storage.remove(storage.join(shard_dir, name))


def sweep(shard_dir: Path | str, named: set[str]) -> list[str]:
    """Remove the shard tars in `shard_dir` (top level, shard_name's names) that no row of the dataset names,
    and return their names: the tars of a group a stopped job wrote without getting to its marker, when the
    rerun gives the group's inputs to another group (regroup). Markers and other files are left alone."""
    stray = [n for n in storage.list_files(shard_dir) if SHARD_TAR.fullmatch(n) and n not in named]
    for name in stray:
        storage.remove(storage.join(shard_dir, name))
    return stray
