"""The job's metadata rows on the driver, as one Arrow table rather than one dict per row.

Every sample's metadata (its source, probe, scores, captions, hashes, shard, status: ~49 columns, everything but
the latents and embeddings that stay in the tars) streams to the driver, which checks that every input is
accounted for, readmits duplicates of filtered representatives (readmit.py) and writes the manifest, the rejects
table and the card; a rerun reads the finished groups' rows back from their markers (resume.Done). As one dict
per row of numpy scalars that was ~3.5 KB a sample held (35 GB at ten million); as Arrow columns, with the
columns that repeat (the encoders' descriptions, ~0.6 KB of JSON on every row; status, stage, bucket, shard)
dictionary-encoded, ~1.15 KB (bench/metadata.py measures both).

`Collector` gathers the rows as they come (Ray Data's numpy batches, or dicts) and compacts them every
`COMPACT_ROWS` into one chunk, so per-piece overhead does not grow with the number of batches.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

HEAVY = ("latent", "text_emb", "text_mask", "repa")  # in the tars only: never metadata
# Few distinct values over a whole job: held as dictionaries.
REPEATED = ("modality", "status", "stage", "reason", "decoder", "bucket", "caption_origin", "caption_error",
            "latent_encoder", "text_encoder", "repa_encoder", "latent_shape", "shard_name", "shard_sha256",
            "duplicate_of")
COMPACT_ROWS = 1 << 13
SLICE_ROWS = 256  # `take` slices while its runs are at most one per this many rows, and copies beyond that


def _array(values) -> pa.Array:
    """One column's values (a numpy array or a list, numpy scalars allowed) as an Arrow array."""
    if isinstance(values, np.ndarray) and values.dtype != object:
        return pa.array(values)
    first = next((v for v in values if v is not None), None)
    kind = pa.string() if isinstance(first, str) else pa.binary() if isinstance(first, bytes) else None
    if kind is not None:  # a column of strings (most of them) or of bytes: as it is, checked by Arrow
        try:
            return pa.array(values, kind)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            pass
    values = values.tolist() if isinstance(values, np.ndarray) else values
    return pa.array([v.item() if isinstance(v, np.generic) else v for v in values])


def _encoded(name: str, array: pa.Array) -> pa.Array:
    if name not in REPEATED or pa.types.is_dictionary(array.type):
        return array
    return (array if array.type == pa.string() else array.cast(pa.string())).dictionary_encode()


def from_columns(columns: dict[str, object]) -> pa.Table:
    """A table of the given columns (heavy ones dropped), the REPEATED ones dictionary-encoded."""
    return pa.table({k: _encoded(k, _array(v)) for k, v in columns.items() if k not in HEAVY})


def from_rows(rows: Iterable[dict]) -> pa.Table:
    """Rows given as dicts (keys may differ between rows: a missing value is null)."""
    rows = list(rows)
    names = list(dict.fromkeys(k for r in rows for k in r))
    return from_columns({k: [r.get(k) for r in rows] for k in names})


def from_batch(batch: dict[str, np.ndarray], take: np.ndarray | None = None) -> pa.Table:
    """A numpy batch's rows (those at `take`, else all)."""
    return from_columns({k: v if take is None else v[take] for k, v in batch.items()})


def as_table(rows: pa.Table | Iterable[dict]) -> pa.Table:
    return rows if isinstance(rows, pa.Table) else from_rows(rows)


def concat(tables: list[pa.Table], combine: bool = True) -> pa.Table:
    """Tables of metadata rows as one: columns missing from a table are null there, types are unified (an int
    column meeting a float one becomes float), dictionaries merged; with `combine`, each column one chunk."""
    tables = [t for t in tables if t.num_columns]
    if not tables:
        return pa.table({})
    names = list(dict.fromkeys(n for t in tables for n in t.column_names))
    kinds: dict[str, set[bool]] = {}
    for t in tables:
        for field in t.schema:
            kinds.setdefault(field.name, set()).add(pa.types.is_dictionary(field.type))
    mixed = {name for name, seen in kinds.items() if len(seen) > 1}  # dictionary in one table, plain in another
    out = [_decoded(t, mixed) for t in tables] if mixed else tables
    table = pa.concat_tables(out, promote_options="permissive").select(names).unify_dictionaries()
    return table.combine_chunks() if combine else table


def _decoded(table: pa.Table, names: set[str]) -> pa.Table:
    for i, field in enumerate(table.schema):
        if field.name in names:
            table = table.set_column(i, field.name, plain(table[field.name]))
    return table


def plain(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """A dictionary-encoded column decoded (sorting and some kernels need it); others as they are."""
    return column.cast(column.type.value_type) if pa.types.is_dictionary(column.type) else column


def strings(table: pa.Table, name: str) -> pa.ChunkedArray:
    """A string column with nulls as "" (and "" for every row when the table has no such column)."""
    if name not in table.column_names:
        return pa.chunked_array([pa.array([""] * table.num_rows, pa.string())])
    column = table[name]
    if column.type == pa.string() and not column.null_count:
        return column  # as it is: no copy
    return pc.fill_null(plain(column).cast(pa.string()), "")


def with_column(table: pa.Table, name: str, column) -> pa.Table:
    """`table` with column `name` set to `column` (replaced, or appended)."""
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, column)
    return table.append_column(name, column)


def counts(column: pa.ChunkedArray | pa.Array) -> dict:
    """How many times each value occurs, in order of first occurrence."""
    return {c["values"]: c["counts"] for c in pc.value_counts(column).to_pylist()}


def without(table: pa.Table, ids: Iterable[str]) -> pa.Table:
    """`table` less its rows whose id is in `ids` (by `take`: a few rows out of many, readmission's, leave
    without a copy of the table)."""
    ids = pa.array(list(ids), pa.string())
    if not len(ids) or not table.num_rows:
        return table
    mask = pc.is_in(strings(table, "id"), value_set=ids).to_numpy(zero_copy_only=False)
    return take(table, np.flatnonzero(~mask)) if mask.any() else table


def take(table: pa.Table, at: np.ndarray) -> pa.Table:
    """The rows of `table` at the ascending positions `at`: the table itself when they are all of it, else
    slices of it (sharing its buffers: no copy of the driver's whole metadata) while the runs of consecutive
    positions are at most one per SLICE_ROWS rows, else a copy (where the slices' per-chunk overhead would
    approach one)."""
    if not len(at):
        return table.slice(0, 0)
    breaks = np.flatnonzero(np.diff(at) != 1) + 1
    starts, ends = np.append(0, breaks), np.append(breaks, len(at))
    if len(starts) == 1 and len(at) == table.num_rows:
        return table
    if len(starts) > max(1, len(at) // SLICE_ROWS):
        return table.take(pa.array(at))
    return pa.concat_tables([table.slice(int(at[a]), int(b - a)) for a, b in zip(starts.tolist(), ends.tolist())])


class Collector:
    """Metadata rows as they come: the pieces joined into one chunk every COMPACT_ROWS rows, so a column's
    per-chunk overhead is paid once per chunk, not once per batch, and no row is copied twice.

    Numpy batches (`add_batch`) wait as they are until COMPACT_ROWS rows have come and then become Arrow in one
    conversion per column: Ray Data hands the driver batches of a stage's batch size (32 rows, say), and one
    conversion of each of ~49 columns per batch cost ~8 s a million rows more than a dict per row did. Batches
    wait together only while their columns agree in names, kinds and shapes; one that differs starts a new run."""

    def __init__(self) -> None:
        self._chunks: list[pa.Table] = []
        self._loose: list[pa.Table] = []
        self._rows = 0
        self._batches: list[dict[str, np.ndarray]] = []
        self._layout: tuple | None = None
        self._batch_rows = 0

    def add(self, table: pa.Table) -> None:
        self._convert()  # the batches waiting came first: the rows keep the order they came in
        self._append(table)

    def _append(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self._loose.append(table)
        self._rows += table.num_rows
        if self._rows >= COMPACT_ROWS:
            self._chunks.append(concat(self._loose))
            self._loose, self._rows = [], 0

    def add_batch(self, batch: dict[str, np.ndarray], take: np.ndarray | None = None) -> None:
        """A numpy batch's rows (those at `take`, else all)."""
        batch = {k: np.asarray(v) if take is None else np.asarray(v)[take] for k, v in batch.items() if k not in HEAVY}
        n = len(next(iter(batch.values()))) if batch else 0
        if not n:
            return
        layout = tuple((k, v.dtype.kind if v.dtype.kind in "OUS" else v.dtype.str, v.shape[1:])
                       for k, v in batch.items())
        if layout != self._layout:
            self._convert()
            self._layout = layout
        self._batches.append(batch)
        self._batch_rows += n
        if self._batch_rows >= COMPACT_ROWS:
            self._convert()

    def _convert(self) -> None:
        """The waiting numpy batches as one piece."""
        if self._batches:
            batches, self._batches, self._batch_rows = self._batches, [], 0
            self._append(from_columns({k: np.concatenate([b[k] for b in batches]) for k in batches[0]}))

    def table(self) -> pa.Table:
        """Every row so far, as one table (in chunks of about COMPACT_ROWS rows)."""
        self._convert()
        return concat(self._chunks + ([concat(self._loose)] if self._loose else []), combine=False)
