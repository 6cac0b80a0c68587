"""Discovery: every file under the input root becomes one row, so every input can be accounted for.

The rows are one Arrow table (`discover_table`): a dict per input held ~0.75 KB on the driver (7.5 GB at ten
million inputs), the table ~0.25 KB (bench/discover.py). `discover` gives them as dicts, for small corpora and
tests."""
from __future__ import annotations

import hashlib
import os
import posixpath
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from latentforge.datasets import storage

CAPTION_EXT = ".txt"
COLUMNS = ("id", "uri", "relpath", "caption_path", "status", "reason", "message", "stage", "input_signature")
LISTED = pa.schema([(name, pa.string()) for name in COLUMNS])  # as listed; then each input's group
SCHEMA = LISTED.append(pa.field("shard", pa.int64()))
CHUNK = 8_192  # rows listed before they become Arrow columns: bounds the Python strings held at once


def sample_id(relpath: str) -> str:
    """A stable id from the path under the input root (no dots: WebDataset splits keys at the first dot)."""
    return "s" + hashlib.sha1(relpath.encode("utf-8")).hexdigest()[:16]


class _Listing:
    """Discovered inputs gathered as columns, CHUNK rows at a time into Arrow record batches."""

    def __init__(self, progress: Callable[[int], None] | None = None) -> None:
        self.columns: dict[str, list[str]] = {name: [] for name in COLUMNS}
        self.batches: list[pa.RecordBatch] = []
        self.progress = progress
        self.rows = 0

    def add(self, relpath: str, uri: str, caption_path: str, signature: str,
            reason: str = "", message: str = "") -> None:
        """A discovered input, local or remote: `caption_path` is its paired caption's, or where one would be;
        `signature` the size and modification time of the file and of its caption (see `signature`); `reason`
        and `message` when discovery rejects it."""
        values = (sample_id(relpath), uri, relpath, caption_path, "rejected" if reason else "ok", reason, message,
                  "discover" if reason else "", signature)
        for name, value in zip(COLUMNS, values):
            self.columns[name].append(value)
        if len(self.columns["id"]) >= CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self.columns["id"]:
            self.batches.append(pa.RecordBatch.from_arrays([pa.array(self.columns[n], pa.string()) for n in COLUMNS],
                                                           names=list(COLUMNS)))
            self.rows += len(self.columns["id"])
            self.columns = {name: [] for name in COLUMNS}
        if self.progress is not None:
            self.progress(self.rows)

    def table(self) -> pa.Table:
        self._flush()
        return pa.Table.from_batches(self.batches, LISTED)


def _readable(name: str) -> str | None:
    """None for a name that is valid UTF-8; else the name with its undecodable bytes written as \\xNN. os.walk
    hands such bytes over as lone surrogates, which no Arrow column (nor Parquet, nor JSON) can hold."""
    try:
        name.encode("utf-8")
        return None
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")


def signature(media: tuple[int, int | None] | None, caption: tuple[int, int | None] | None = None) -> str:
    """'size:mtime_ns' of an input file, then '|' and its caption's when it has one: what a rerun compares with
    the done-markers to notice an input or its caption changed in place under the same name (resume.py). Cheap:
    one stat, or the listing's entry on an object store; a change that keeps both size and time is missed."""
    def one(info):
        return "missing" if info is None else f"{info[0]}:{'' if info[1] is None else info[1]}"

    return one(media) + ("" if caption is None else "|" + one(caption))


def inputs_digest(rows: pa.Table | list[dict]) -> str:
    """What a curation was made from, in 16 hex digits: every discovered input's path and signature (the
    SHA-256 of `relpath NUL signature LF` for each, in path order), hashed from the Arrow buffers a chunk at a
    time rather than a string per row."""
    table = as_inputs(rows)
    table = in_order(table.select([c for c in ("relpath", "input_signature") if c in table.column_names]),
                     [("relpath", "ascending")])
    signatures = (pc.fill_null(table["input_signature"].cast(pa.string()), "")
                  if "input_signature" in table.column_names else pa.array([""] * table.num_rows, pa.string()))
    lines = pc.binary_join_element_wise(table["relpath"].cast(pa.string()), signatures, "\0")
    lines = pc.binary_join_element_wise(lines, "", "\n")  # "path\0signature" then "\n"
    h = hashlib.sha256()
    for chunk in lines.cast(pa.large_string()).chunks:
        if not len(chunk):
            continue
        offsets = np.frombuffer(chunk.buffers()[1], np.int64, len(chunk) + 1, chunk.offset * 8)
        h.update(memoryview(chunk.buffers()[2])[offsets[0]:offsets[-1]])
    return h.hexdigest()[:16]


def in_order(table: pa.Table, keys: list[tuple[str, str]]) -> pa.Table:
    """`table` sorted by `keys`: itself, not a copy, when it is in that order already (discover_table's rows
    are in path order)."""
    order = pc.sort_indices(table, keys).to_numpy()
    return table if np.array_equal(order, np.arange(len(order))) else table.take(order)


def as_inputs(rows: pa.Table | list[dict]) -> pa.Table:
    """Discovered inputs as a table: a table as it is; dicts (tests, small corpora) converted."""
    if isinstance(rows, pa.Table):
        return rows
    return pa.Table.from_pylist(list(rows)) if rows else SCHEMA.empty_table()


def group_sizes(rows: pa.Table | list[dict]) -> Counter:
    """Inputs per shard group."""
    if not isinstance(rows, pa.Table):
        return Counter(int(r["shard"]) for r in rows)
    counts = pc.value_counts(rows["shard"]).flatten() if rows.num_rows else [pa.array([]), pa.array([])]
    return Counter(dict(zip(counts[0].to_pylist(), counts[1].to_pylist())))


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)  # follows a link: its target's content is what is read
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _hidden(relpath: str) -> bool:
    """Dot files and anything in a dot directory (.git, .cache, ...): not inputs, nor captions."""
    return any(part.startswith(".") for part in relpath.split("/"))


def _captions_by_stem(paths: list[str]) -> dict[str, str]:
    """Caption files by their path less the extension, matched without regard to its case (`cat.TXT` is
    `cat.png`'s caption); where both `cat.txt` and `cat.TXT` exist, the lower-case one."""
    out: dict[str, str] = {}
    for p in sorted(paths, key=lambda p: p.endswith(CAPTION_EXT)):  # exact ".txt" last, so it wins
        if p.lower().endswith(CAPTION_EXT):
            out[p[:-len(CAPTION_EXT)]] = p
    return out


def discover(root: str | Path, samples_per_shard: int) -> list[dict]:
    """discover_table's rows as dicts (small corpora and tests)."""
    return discover_table(root, samples_per_shard).to_pylist()


def discover_table(root: str | Path, samples_per_shard: int,
                   progress: Callable[[int], None] | None = None) -> pa.Table:
    """Rows for all non-caption files under `root` (a directory or a URI prefix such as s3://bucket/corpus),
    sorted by path, each assigned a shard index (`shard`), as one Arrow table (SCHEMA).

    Symlinks are not followed into directories, and a linked file that resolves outside the root is
    rejected here rather than read; so is a file whose name (or a directory's above it) is not valid UTF-8,
    since no table can name it: its row's paths write the bytes as \\xNN.
    `progress` is called with the number of inputs listed so far, every CHUNK of them and at the end.
    """
    listing = _Listing(progress)
    if storage.is_remote(root):
        _remote_rows(str(storage.as_location(root)), listing)
    else:
        _local_rows(root, listing)
    table = in_order(listing.table(), [("relpath", "ascending")])  # UTF-8 bytes sort as code points, as str does
    shard = np.arange(table.num_rows, dtype=np.int64) // samples_per_shard
    del listing
    # The listing's record batches and the unsorted table (a local walk is not in path order; an object store's
    # listing is) are freed, but Arrow's allocator (mimalloc) would keep their pages, about twice the table
    # (~0.4 KB an input): handed back, the driver holds the table alone.
    pa.default_memory_pool().release_unused()
    return table.append_column("shard", pa.array(shard))


def _remote_rows(root: str, listing: _Listing) -> None:
    """One row per object under the prefix; stages fetch an object only when they read it (stage.py)."""
    infos = {p: info for p, info in storage.file_infos(root).items() if not _hidden(p)}
    names = sorted(infos)
    captions = _captions_by_stem(names)
    for relpath in names:
        if relpath.lower().endswith(CAPTION_EXT):
            continue
        uri = storage.join(root, relpath)
        caption = captions.get(posixpath.splitext(relpath)[0])
        caption_uri = storage.join(root, caption) if caption else storage.with_suffix(uri, CAPTION_EXT)
        listing.add(relpath, uri, caption_uri, signature(infos[relpath], infos[caption] if caption else None))


def _local_rows(root: str | Path, listing: _Listing) -> None:
    """One row per file under `root`. Paths are joined as strings: pathlib's parsing cost ~25 us a file, most
    of a listing's time, and a million files' worth of it is most of a minute."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"input directory {root} does not exist")
    top = str(root)
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        names = [n for n in filenames if not n.startswith(".")]
        captions = _captions_by_stem(names)
        prefix = dirpath[len(top):].lstrip("/") + "/" if dirpath != top else ""
        for name in names:
            if name.lower().endswith(CAPTION_EXT):
                continue
            path, relpath = os.path.join(dirpath, name), prefix + name
            stem = posixpath.splitext(name)[0]
            caption = captions.get(stem)
            caption_path = os.path.join(dirpath, caption or stem + CAPTION_EXT)
            readable = _readable(path)
            if readable is not None:
                shown = _readable(relpath) or relpath
                listing.add(shown, readable, _readable(caption_path) or caption_path, "", "undecodable_name",
                            f"file name '{shown}' is not valid UTF-8 (rename it, e.g. with convmv, to curate it)")
                continue
            args = (relpath, path, caption_path, signature(_stat(path), _stat(caption_path) if caption else None))
            if os.path.islink(path) and not Path(os.path.realpath(path)).is_relative_to(root):
                listing.add(*args, "outside_root", f"symlink {relpath} points outside the input root")
            else:
                listing.add(*args)


def orphan_captions(root: str | Path) -> list[str]:
    """Caption files with no media file beside them (reported, not inputs), as relative paths, sorted (a name
    that is not valid UTF-8 with its bytes written as \\xNN, as discover_table writes it)."""
    if storage.is_remote(root):
        return _unpaired([p for p in storage.list_files(root) if not _hidden(p)])
    root = Path(root).resolve()
    relpaths = []
    for d, dirnames, names in os.walk(root):
        dirnames[:] = [n for n in dirnames if not n.startswith(".")]  # as discover: .git's files are no captions
        relpaths += [(Path(d) / n).relative_to(root).as_posix() for n in names if not n.startswith(".")]
    return [_readable(p) or p for p in _unpaired(relpaths)]


def _unpaired(relpaths: list[str]) -> list[str]:
    """The captions among `relpaths` whose path less `.txt` is no media file's path less its suffix (how
    discover pairs them). One set over the listing: a glob per caption, as this once was, lists the caption's
    directory each time (quadratic: 12.8 s of a 5,776-input job's 97 s) and misreads names with glob characters."""
    media = {posixpath.splitext(f)[0] for f in relpaths if not f.lower().endswith(CAPTION_EXT)}
    paired = set(_captions_by_stem(relpaths).items())  # one caption per media file, as discover pairs them
    return sorted(f for f in relpaths if f.lower().endswith(CAPTION_EXT)
                  and (f[:-len(CAPTION_EXT)] not in media or (f[:-len(CAPTION_EXT)], f) not in paired))
