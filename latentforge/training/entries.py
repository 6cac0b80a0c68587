"""The samples a stage selects, held column by column: what every rank and DataLoader worker keeps for a run.

A list of one Python object per sample kept ~290 MB of Python heap per rank at a million samples (peaking at
~540 MB while built; `bench/plan_memory.py`), on every rank of a node, and a DataLoader worker forked from its
rank copies the pages of the objects it reads (reference counts are writes). Here the selection is a few numpy
arrays (keys as UTF-8 bytes; shard, shape and modality as indices into short lists), ~33 MB at a million,
which forked workers share as they are.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from latentforge.datasets.columns import fixed_width
from latentforge.datasets.manifest import Dataset


class Entry(NamedTuple):
    """One selected sample, as the manifest describes it (no shard read needed)."""

    dataset: int
    key: str
    shard: str  # shard URI, opened by shard_reader.open_shard
    shape: tuple[int, ...]  # latent (C, T, H, W)
    modality: str


class Entries:
    """Selected samples in (shard, key) order. `entries[i]` is an `Entry`; the `*_index` arrays and their
    lists (`shards`, `shapes`, `modalities`) serve code that walks many samples at once."""

    def __init__(self, dataset: np.ndarray, keys: np.ndarray, shard_index: np.ndarray, shards: list[str],
                 shape_index: np.ndarray, shapes: list[tuple[int, ...]], modality_index: np.ndarray,
                 modalities: list[str]):
        self.dataset, self.keys = dataset, keys
        self.shard_index, self.shards = shard_index, shards
        self.shape_index, self.shapes = shape_index, shapes
        self.modality_index, self.modalities = modality_index, modalities

    @classmethod
    def of(cls, entries: Sequence[Entry]) -> Entries:
        """From Entry objects, in the order given (tests, and anything already an `Entries`)."""
        if isinstance(entries, Entries):
            return entries
        shards, shard_index = _index([e.shard for e in entries])
        shapes, shape_index = _index([tuple(e.shape) for e in entries])
        modalities, modality_index = _index([e.modality for e in entries])
        return cls(np.array([e.dataset for e in entries], dtype=np.int32), fixed_width([e.key for e in entries]),
                   shard_index, shards, shape_index, shapes, modality_index, modalities)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> Entry:
        return Entry(int(self.dataset[i]), self.keys[i].decode(), self.shards[self.shard_index[i]],
                     self.shapes[self.shape_index[i]], self.modalities[self.modality_index[i]])

    def __iter__(self) -> Iterator[Entry]:
        return (self[i] for i in range(len(self)))

    def take(self, indices: np.ndarray | list[int]) -> Entries:
        """The entries at `indices`, in that order (the short lists are shared)."""
        at = np.asarray(indices, dtype=np.int64)
        return Entries(self.dataset[at], self.keys[at], self.shard_index[at], self.shards, self.shape_index[at],
                       self.shapes, self.modality_index[at], self.modalities)

    def key(self, i: int) -> str:
        return self.keys[i].decode()

    def shard(self, i: int) -> str:
        return self.shards[self.shard_index[i]]

    def shape(self, i: int) -> tuple[int, ...]:
        return self.shapes[self.shape_index[i]]


def is_validation(key: str, fraction: float) -> bool:
    """A stable held-out split by sample id: the same samples whatever the worker count or order."""
    return fraction > 0 and int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 2**32 < fraction


def select_entries(datasets: list[Dataset], where: str | None, modalities: list[str], val_fraction: float,
                   split: str = "train") -> Entries:
    """The samples a selection picks (manifest `where`, modalities, train/val split by id hash), sorted by
    (shard, key): the order they lie in the shards. Built from the manifest's Arrow columns without a Python
    object per sample (the train/val split hashes each id, one at a time)."""
    parts = []
    for n, ds in enumerate(datasets):
        table = ds.select(where, modalities).combine_chunks()
        if val_fraction > 0:
            held = np.fromiter((is_validation(k, val_fraction) for k in table["id"].to_pylist()), dtype=bool,
                               count=table.num_rows)
            table = table.filter(pa.array(held == (split == "val")))
        elif split == "val":
            table = table.slice(0, 0)
        missing = pc.fill_null(pc.list_value_length(table["latent_shape"]), 0).to_numpy() == 0
        if missing.any():
            key = table["id"][int(np.flatnonzero(missing)[0])].as_py()
            raise ValueError(f"{ds.root}: manifest row {key!r} has no latent_shape (needed to plan batches)")
        parts.append((n, ds, table))
    shard_uris = sorted({str(ds.shard_path(name)) for _, ds, t in parts for name in pc.unique(t["shard"]).to_pylist()})
    shard_rank = {uri: i for i, uri in enumerate(shard_uris)}  # index order = URI order
    shapes: list[tuple[int, ...]] = []
    columns = {"dataset": [], "keys": [], "shard": [], "shape": [], "modality": []}
    kinds = sorted({m for _, _, t in parts for m in pc.unique(t["modality"]).to_pylist()})
    for n, ds, table in parts:
        columns["dataset"].append(np.full(table.num_rows, n, dtype=np.int32))
        columns["keys"].append(table["id"].cast(pa.large_string()))  # pandas / polars write large_string too
        columns["shard"].append(_codes(table["shard"], lambda name: shard_rank[str(ds.shard_path(name))]))
        columns["modality"].append(_codes(table["modality"], kinds.index))
        columns["shape"].append(_shape_codes(table["latent_shape"], shapes))
    if not parts or not sum(len(d) for d in columns["dataset"]):
        empty = np.zeros(0, np.int32)
        return Entries(empty, np.zeros(0, "S1"), empty, shard_uris, empty, shapes, empty, kinds)
    keys = fixed_width(pa.chunked_array([c for k in columns["keys"] for c in k.chunks], pa.large_string()))
    shard_index = np.concatenate(columns["shard"])
    entries = Entries(np.concatenate(columns["dataset"]), keys, shard_index, shard_uris,
                      np.concatenate(columns["shape"]), shapes, np.concatenate(columns["modality"]), kinds)
    entries = entries.take(np.lexsort((keys, shard_index)))
    same = np.flatnonzero((entries.shard_index[1:] == entries.shard_index[:-1])
                          & (entries.keys[1:] == entries.keys[:-1]))
    if len(same):  # the reader finds a sample by (shard, key): two would never both be read
        a, b = entries[int(same[0])], entries[int(same[0]) + 1]
        raise ValueError(f"sample {a.key!r} of shard {a.shard} is selected twice (datasets "
                         f"{datasets[a.dataset].root} and {datasets[b.dataset].root})")
    return entries


def _codes(column: pa.ChunkedArray, code_of) -> np.ndarray:
    """Each value's code, computed once per distinct value (`code_of(value)`)."""
    encoded = column.combine_chunks().dictionary_encode()
    table = np.array([code_of(v) for v in encoded.dictionary.to_pylist()] or [0], dtype=np.int32)
    return table[encoded.indices.to_numpy(zero_copy_only=False)]


def _shape_codes(column: pa.ChunkedArray, shapes: list[tuple[int, ...]]) -> np.ndarray:
    """Each latent shape's position in `shapes` (extended with shapes not there yet)."""
    column = column.combine_chunks()
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    ends = np.cumsum(lengths)
    codes = np.empty(len(lengths), dtype=np.int32)
    for rank in np.unique(lengths).tolist():  # shapes of one rank at a time (4 for every latent today)
        rows = np.flatnonzero(lengths == rank)
        matrix = values[(ends[rows] - rank)[:, None] + np.arange(rank)] if len(rows) else np.zeros((0, rank))
        distinct, inverse = np.unique(matrix, axis=0, return_inverse=True)
        shapes += [shape for shape in map(tuple, distinct.tolist()) if shape not in shapes]
        codes[rows] = np.array([shapes.index(tuple(row)) for row in distinct.tolist()], dtype=np.int32)[
            inverse.reshape(-1)]
    return codes


def _index(values: list) -> tuple[list, np.ndarray]:
    """(the distinct values, sorted; each value's position among them)."""
    distinct = sorted(set(values))
    position = {v: i for i, v in enumerate(distinct)}
    return distinct, np.array([position[v] for v in values], dtype=np.int32)
