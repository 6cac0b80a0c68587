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

A rerun reads every marker back: the finished rows go into one Arrow table as each marker is read (`Done`), and
the checks above run over its columns, so a rerun of a job of millions holds them as the job did (meta.py).
"""
from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from latentforge.datasets import storage
from latentforge.datasets.shards import partial_path
from latentforge.pipelines import meta as mt
from latentforge.pipelines.discover import as_inputs, group_sizes, in_order

DONE_DIR = "_done"
MARKER = re.compile(r"group-\d+\.json")  # marker_name's names
SHARD_TAR = re.compile(r"shard-\d{6,}-\d{2,}\.tar")  # write_shards.shard_name's names
BYTES_TAG = "__b64__"
READERS = 16  # threads reading done-markers on an object store (done_groups)


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


class Done(Mapping):
    """Groups an earlier run finished (done_groups): group -> its metadata rows, each group a slice of one table
    (meta.py). A rerun of a job of millions holds its finished rows as the job did, in columns, not as the
    markers' dicts (~3.5 KB a row). Groups taken out (`pop`: stale ones, readmission's) leave `rows()`."""

    def __init__(self, table: pa.Table | None = None, bounds: dict[int, tuple[int, int]] | None = None) -> None:
        self.table = table if table is not None else pa.table({})
        self.bounds = dict(sorted((bounds or {}).items()))  # group -> (first row, rows), by group number

    @classmethod
    def of(cls, groups: Mapping[int, pa.Table | list[dict]]) -> Done:
        """From groups given as tables or dicts (markers read elsewhere, tests)."""
        if isinstance(groups, Done):
            return groups
        collector, bounds, start = mt.Collector(), {}, 0
        for g, rows in sorted(groups.items()):
            table = mt.as_table(rows)
            collector.add(table)
            bounds[int(g)] = (start, table.num_rows)
            start += table.num_rows
        return cls(collector.table(), bounds)

    def __getitem__(self, group: int) -> pa.Table:
        start, n = self.bounds[group]
        return self.table.slice(start, n)

    def __iter__(self):
        return iter(self.bounds)

    def __contains__(self, group) -> bool:  # without slicing the table (Mapping's asks for the item)
        return group in self.bounds

    def __len__(self) -> int:
        return len(self.bounds)

    def pop(self, group: int) -> pa.Table:
        rows = self[group]
        del self.bounds[group]
        return rows

    def positions(self) -> tuple[np.ndarray, np.ndarray]:
        """The rows of the groups still here (positions in `table`, by group) and each one's group."""
        if not self.bounds:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        starts, sizes = (np.array(v, np.int64) for v in zip(*self.bounds.values()))
        groups = np.repeat(np.fromiter(self.bounds, np.int64, len(self.bounds)), sizes)
        offsets = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        return np.repeat(starts, sizes) + offsets, groups

    def rows(self) -> pa.Table:
        """Every row of the groups still here, in group order (meta.take: the table itself while no group was
        taken out, else slices of it while they are few)."""
        return mt.take(self.table, self.positions()[0])


def done_groups(shard_dir: Path | str, config_hash: str, check: str = "size", readers: int | None = None) -> Done:
    """Groups whose marker matches this config and whose tars are intact: group -> metadata rows (`Done`).

    `check` (CurationConfig.resume_check): "size", each tar the size its marker recorded, from one listing of
    `shard_dir` (a tar cut short, or rewritten at another size, is not trusted; markers written before sizes
    were recorded are checked by sha256); "sha256", each tar read back and hashed, as it streams in when
    `shard_dir` is a URI (s3://...): the whole dataset is read. Each marker's rows go into columns as it is
    read (meta.Collector), a few thousand rows at a time, so the dicts of a few markers at a time exist.

    `readers` threads fetch and check the markers, a window of them at a time, taken in order (default: READERS
    on an object store, where each marker is a request: 15,625 of them one after another are minutes of round
    trips; one on a local disk, where a read is a page-cache copy)."""
    from concurrent.futures import ThreadPoolExecutor

    collector, bounds, start, loose = mt.Collector(), {}, 0, []
    infos = storage.file_infos(shard_dir)  # every file's size, in one listing
    names = [p for p in sorted(infos) if p.startswith(DONE_DIR + "/") and MARKER.fullmatch(p[len(DONE_DIR) + 1:])]
    readers = readers or (READERS if storage.is_remote(shard_dir) else 1)

    def read(path: str) -> dict | None:
        """The marker's body when it matches this config and its tars are intact, else None."""
        try:
            body = json.loads(storage.read_text(storage.join(shard_dir, path)))
        except ValueError:
            return None
        sizes = body.get("sizes") if check == "size" else None

        def intact(tar: str, digest: str) -> bool:
            if tar not in infos:
                return False
            if sizes is not None:
                return infos[tar][0] == sizes.get(tar)
            return storage.sha256(storage.join(shard_dir, tar)) == digest

        ok = body.get("config_hash") == config_hash and all(intact(s, h) for s, h in body["shards"].items())
        return body if ok else None

    with ThreadPoolExecutor(max_workers=readers, thread_name_prefix="lf-marker-reader") as pool:
        for at in range(0, len(names), readers * 4):  # a window: the bodies in flight stay few
            window = names[at:at + readers * 4]
            for path, body in zip(window, pool.map(read, window) if readers > 1 else map(read, window)):
                if body is None:
                    continue
                loose += body["rows"]
                bounds[int(path[len(DONE_DIR) + len("/group-"):-len(".json")])] = (start, len(body["rows"]))
                start += len(body["rows"])
                if len(loose) >= mt.COMPACT_ROWS:
                    collector.add(_marker_rows(loose))
                    loose = []
    collector.add(_marker_rows(loose))
    return Done(collector.table(), bounds)


def _marker_rows(rows: list[dict]) -> pa.Table:
    """Markers' rows as read from their JSON, in columns: the columns whose values came tagged as bytes
    (`_plain`) decoded, one column at a time (not every value of every row looked at)."""
    columns = {k: [r.get(k) for r in rows] for k in dict.fromkeys(k for r in rows for k in r)}
    for name, values in columns.items():
        first = next((v for v in values if v is not None), None)
        if isinstance(first, dict) and BYTES_TAG in first:
            columns[name] = [_restore(v) for v in values]
    return mt.from_columns(columns)


def input_ids(rows: pa.Table | list[dict]) -> set[str]:
    """The inputs `rows` came from: each row's `source_id` (a clip's input; the row's own id when unsplit).
    Kept, filtered and rejected rows alike: every input is accounted for by one of them."""
    return set(_sources(mt.as_table(rows)).to_pylist())


def _sources(table: pa.Table) -> pa.ChunkedArray:
    """Each row's input: its source_id, or its id when it has none."""
    source = mt.strings(table, "source_id")
    return pc.if_else(pc.equal(source, ""), mt.strings(table, "id"), source)


def stale_groups(done: Mapping[int, pa.Table | list[dict]], rows: pa.Table | list[dict]) -> list[int]:
    """The groups of `done` (done_groups) whose marker rows came from other inputs than the discovered `rows`
    now assign to the group (inputs added or removed since it was written), that no input is assigned to, or
    whose inputs or captions changed in place since (their `input_signature`, size and modification time,
    differs; markers written before signatures were recorded are judged by their inputs' ids alone).
    In columns over all finished rows and all inputs at once."""
    done, rows = Done.of(done), as_inputs(rows)
    at, group = done.positions()
    if not rows.num_rows:  # every group that holds an input is stale
        return sorted(set(group.tolist()))
    if not len(at):  # groups without rows: stale where an input is assigned to them
        return sorted(set(done) & set(group_sizes(rows)))
    shard = rows["shard"].to_numpy()
    table = done.table.take(pa.array(at)).select([c for c in ("id", "source_id", "input_signature")
                                                  if c in done.table.column_names])
    sources = _sources(table)
    found = pc.index_in(sources, value_set=rows["id"].cast(pa.string())).fill_null(-1).to_numpy()
    elsewhere = (found < 0) | (shard[np.maximum(found, 0)] != group)  # an input gone, or now another group's
    if "input_signature" in table.column_names:
        now = (rows["input_signature"].cast(pa.string()) if "input_signature" in rows.column_names
               else pa.nulls(rows.num_rows, pa.string())).take(pa.array(np.maximum(found, 0)))
        then = table["input_signature"].cast(pa.string())
        changed = pc.and_(pc.is_valid(then), pc.invert(pc.fill_null(pc.equal(then, now), False)))
        elsewhere |= changed.to_numpy(zero_copy_only=False)
    stale = set(np.unique(group[elsewhere]).tolist())
    # an input now assigned to a group whose marker does not hold it
    held = pa.table({"group": group, "source": sources}).group_by("group").aggregate([("source", "count_distinct")])
    holds = dict(zip(held["group"].to_pylist(), held["source_count_distinct"].to_pylist()))
    assigned = group_sizes(rows)
    stale |= {g for g in done if holds.get(g, 0) != assigned.get(g, 0)}
    return sorted(stale)


def regroup(rows: pa.Table | list[dict], done: Mapping[int, pa.Table | list[dict]], taken: set[int],
            per_group: int) -> tuple[pa.Table, bool, list[int]]:
    """Assign `rows` (discovered: sorted by path, groups by index) to shard groups given the finished groups
    `done` (the job's own, by done_groups) and `taken` (other group numbers an earlier run used: readmission's).
    Returns the rows with their groups (`shard`), sorted by group, then path; whether the finished groups kept
    their inputs; and the stale ones (stale_groups, on the assignment made): none when discovery's assignment
    stands (it agrees with every finished group, and no number in `taken` is one of its groups).

    Kept: an input a finished group holds stays in that group (the first such group, by number); a finished group
    that lost an input or holds a changed one is then stale and redone under its number with what it still
    holds; the other inputs go, in path order, `per_group` at a time, to groups numbered from one past every
    number in `done` and `taken`.
    """
    done, rows = Done.of(done), as_inputs(rows)
    if not rows.num_rows:
        return rows, False, []
    shard = rows["shard"].to_numpy()
    kept = bool(stale_groups(done, rows)) or any(g <= int(shard.max()) for g in taken)
    if kept:
        at, group = done.positions()  # by group: an input's first group is its first occurrence
        sources = _sources(done.table.take(pa.array(at))) if len(at) else pa.array([], pa.string())
        found = pc.index_in(rows["id"].cast(pa.string()), value_set=sources).fill_null(-1).to_numpy()
        held = found >= 0
        first = 1 + max([*map(int, done), *taken], default=-1)
        shard = np.where(held, group[np.maximum(found, 0)] if len(group) else 0, 0).astype(np.int64)
        shard[~held] = first + np.arange(int((~held).sum())) // per_group  # in path order
        rows = rows.set_column(rows.column_names.index("shard"), "shard", pa.array(shard))
    rows = in_order(rows, [("shard", "ascending"), ("relpath", "ascending")])
    return rows, kept, stale_groups(done, rows) if kept else []


def discard_group(shard_dir: Path | str, group: int, rows: pa.Table | list[dict]) -> None:
    """Remove a stale group's done-marker, then the tars its marker `rows` name, so neither survives into the
    dataset when the group is redone (a redone group may write fewer parts, or none). The marker goes first:
    a crash in between leaves tars without a marker, which a rerun redoes anyway."""
    storage.remove(storage.join(shard_dir, DONE_DIR, marker_name(group)))
    for name in sorted(set(mt.strings(mt.as_table(rows), "shard_name").to_pylist()) - {""}):
        storage.remove(storage.join(shard_dir, name))


def sweep(shard_dir: Path | str, named: set[str]) -> list[str]:
    """Remove the shard tars in `shard_dir` (top level, shard_name's names) that no row of the dataset names,
    and return their names: the tars of a group a stopped job wrote without getting to its marker, when the
    rerun gives the group's inputs to another group (regroup). Markers and other files are left alone."""
    stray = [n for n in storage.list_files(shard_dir) if SHARD_TAR.fullmatch(n) and n not in named]
    for name in stray:
        storage.remove(storage.join(shard_dir, name))
    return stray
