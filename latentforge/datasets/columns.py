"""Arrow string columns as numpy arrays without a Python object per value: what the driver-side passes over a
whole corpus (the training selection, the dedup barrier) hold instead of one str per row."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def large_strings(column: pa.Array | pa.ChunkedArray | list) -> pa.LargeStringArray:
    """One contiguous large_string array (int64 offsets) of any string column: pandas and polars write
    large_string, Ray Data's blocks string; nulls become ""."""
    array = column if isinstance(column, (pa.Array, pa.ChunkedArray)) else pa.array(column, pa.string())
    array = pc.fill_null(array.cast(pa.large_string()), "")
    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array


def fixed_width(column: pa.Array | pa.ChunkedArray | list, align: str = "left", fill: bytes = b"\0") -> np.ndarray:
    """UTF-8 strings as one fixed-width bytes array, straight from the Arrow buffers.

    Left-aligned (and NUL-padded), numpy compares and sorts them bytewise, which orders them as Python orders
    the strings (numpy drops trailing NULs, so a value must not end in one). Right-aligned with `fill` (b"0"
    for hex digits, as `str.rjust` pads them) they line up by their last character."""
    strings = large_strings(column)
    buffers = strings.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int64)[strings.offset:strings.offset + len(strings) + 1]
    data = np.frombuffer(buffers[2], dtype=np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    width = max(1, int(lengths.max(initial=0)))
    out = np.full((len(strings), width), fill[0], dtype=np.uint8)
    place = np.arange(width) < lengths[:, None] if align == "left" else np.arange(width) >= width - lengths[:, None]
    out[place] = data[offsets[0]:offsets[-1]]
    return out.view(f"S{width}").reshape(len(strings))


def codes(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Each value's code (int64): equal values, equal codes; by Arrow's hash table, without sorting."""
    encoded = pc.dictionary_encode(large_strings(column))
    return encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)


def first_of_each(codes: np.ndarray) -> np.ndarray:
    """For each position, the first position holding its code."""
    if not len(codes):
        return np.zeros(0, np.int64)
    distinct, first = np.unique(codes, return_index=True)
    lookup = np.zeros(int(distinct[-1]) + 1, np.int64)
    lookup[distinct] = first
    return lookup[codes]
