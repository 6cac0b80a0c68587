"""Every pair of perceptual hashes within a Hamming distance, in numpy: the near-duplicate search at corpus scale.

Pigeonhole banding: cut the bits into max_distance + k bands, and two hashes within max_distance bits agree
exactly on at least k of them. So each k-subset of bands is a sort key, the candidates are the pairs that share
a key's value, and each candidate is checked by its real distance; the pairs found do not depend on where the
bands are cut or on k. k = 1 takes the fewest sorts; a larger k makes wider keys and far fewer candidates,
which pays for its extra sorts on a large corpus (`agreeing_bands`).

Sorting each key puts equal values in runs; the candidates are the pairs inside a run (each position against
its later run-mates, one offset at a time, the hashes in the key's order) or, between two sets, a row and the
other set's run of its value (enumerated in bounded chunks), checked by XOR and popcount over whole arrays.
The same search in Python sets and loops (the first version, k = 1) took 3-4 s at 100k hashes and 20-34 s at
300k, growing as n^2, on the driver while the cluster waits at the dedup barrier; the whole pass now takes
~4 s at a million and ~1 minute at ten million, in columns (BENCHMARKS.md, `bench/dedup.py`).
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from latentforge.datasets.columns import fixed_width

_CHUNK = 1 << 22  # candidate pairs checked per array operation (bounds memory: ~100 MB of indices)
_MIX = np.uint64(0x9E3779B97F4A7C15)  # folds a band wider than 64 bits into one key (collisions: more candidates)


class HashSet:
    """Hex perceptual hashes as bit arrays, each band's value as one uint64 key. `bits` fixes the width (left-
    padded with zeros, as `int(h, 16)` reads a short hash); two sets compared must share it. No hash may be ""."""

    def __init__(self, phashes: list[str] | pa.Array | pa.ChunkedArray, max_distance: int, bits: int | None = None,
                 agree: int | None = None):
        self.n, self.max_distance = len(phashes), max_distance
        self.bits = bits if bits is not None else width(phashes)
        # `agree` bands of max_distance + agree must match exactly; two sets compared must share it
        self.agree = agree if agree is not None else agreeing_bands(self.n, self.bits, max_distance)
        unpacked = _hex_bits(phashes, self.bits // 4)
        words = _words(unpacked)
        self.columns = [np.ascontiguousarray(column) for column in words.T]  # the whole hash, 64 bits a column
        bands = max_distance + self.agree
        edges = [round(i * self.bits / bands) for i in range(bands + 1)]
        # each band's value as one uint64 (folded when wider); a key is built from them when a search needs it
        self.bands = [_fold(_words(unpacked[:, a:b])) for a, b in zip(edges, edges[1:])]

    def keys(self):
        """One uint64 per hash for each `agree`-subset of the bands: equal when those bands all match (a fold of
        their values; a collision only adds candidates, which are checked by their distance). Built one at a
        time: holding all C(d + k, k) of them cost 8 bytes each per hash at the barrier's peak."""
        for chosen in itertools.combinations(self.bands, self.agree):
            key = chosen[0].copy()
            for value in chosen[1:]:
                key = key * _MIX ^ value
            yield key

    def distance(self, i: np.ndarray, other: HashSet, j: np.ndarray) -> np.ndarray:
        total = np.bitwise_count(self.columns[0][i] ^ other.columns[0][j])
        for mine, theirs in zip(self.columns[1:], other.columns[1:]):
            total += np.bitwise_count(mine[i] ^ theirs[j])
        return total

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """Every (i, j), i < j, within max_distance: two int64 arrays, sorted by i then j.

        Per band, in the band's sorted order: position p against p + 1, p + 2, ... while still in p's run, one
        offset at a time over every position whose run reaches that far. Hashes are compared in sorted order
        (neighbours in memory), and only the close pairs are mapped back to row numbers."""
        found = []
        for keys in self.keys():
            order = np.argsort(keys, kind="stable")
            ends = _run_ends(keys[order])
            columns = [column[order] for column in self.columns]
            active = np.flatnonzero(ends > np.arange(self.n) + 1)  # positions with at least one later run-mate
            offset = 1
            while len(active):
                later = active + offset
                distance = np.bitwise_count(columns[0][active] ^ columns[0][later])
                for column in columns[1:]:
                    distance += np.bitwise_count(column[active] ^ column[later])
                close = distance <= self.max_distance
                if close.any():
                    found.append((order[active[close]], order[later[close]]))
                offset += 1
                active = active[ends[active] > active + offset]
        return _unique([(np.minimum(i, j), np.maximum(i, j)) for i, j in found], self.n)

    def pairs_with(self, other: HashSet) -> tuple[np.ndarray, np.ndarray]:
        """Every (i in self, j in other) within max_distance, sorted by i then j."""
        if (other.bits, other.max_distance, other.agree) != (self.bits, self.max_distance, self.agree):
            raise ValueError("hash sets of different widths, distances or bands")
        found = []
        for mine, theirs in zip(self.keys(), other.keys()):
            order = np.argsort(theirs, kind="stable")
            ordered = theirs[order]
            starts = np.searchsorted(ordered, mine, side="left")
            ends = np.searchsorted(ordered, mine, side="right")
            found += self._checked(np.arange(self.n), starts, ends, order, other)
        return _unique(found, max(other.n, 1))

    def _checked(self, rows: np.ndarray, starts: np.ndarray, ends: np.ndarray, order: np.ndarray,
                 other: HashSet) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each k: rows[k] against other's rows order[starts[k]:ends[k]], kept where within max_distance."""
        counts = np.maximum(ends - starts, 0)
        live = np.flatnonzero(counts)
        rows, starts, counts = rows[live], starts[live], counts[live]
        out, total = [], np.cumsum(counts)
        lo = 0
        while lo < len(live):  # chunks of about _CHUNK candidates (at least one row's run)
            hi = max(lo + 1, int(np.searchsorted(total, (total[lo - 1] if lo else 0) + _CHUNK, side="right")))
            n = counts[lo:hi]
            first = np.repeat(np.cumsum(n) - n, n)
            i = np.repeat(rows[lo:hi], n)
            j = order[np.repeat(starts[lo:hi], n) + np.arange(first.size) - first]
            close = self.distance(i, other, j) <= self.max_distance
            out.append((i[close], j[close]))
            lo = hi
        return out


def agreeing_bands(n: int, bits: int, max_distance: int) -> int:
    """How many bands must match, k, for the least work on n hashes: cut into max_distance + k bands, two hashes
    within max_distance bits agree exactly on at least k of them, so each k-subset of bands is one sort key. A
    larger k means more sorts (C(d + k, k)) but keys of k times the bits, which leave far fewer candidates
    (n^2 / 2^(key bits) / 2 per key). Costs: ~1e-7 s per row and sort, ~1e-8 s per candidate (this machine)."""
    def cost(k: int) -> float:
        keys = math.comb(max_distance + k, k)
        return keys * (n * 1e-7 + n * n / 2 ** (k * bits / (max_distance + k)) / 2 * 1e-8)

    return min((k for k in range(1, 5) if max_distance + k <= bits), key=cost, default=1)


def width(phashes: list[str] | pa.Array | pa.ChunkedArray) -> int:
    """Bits of the longest hash (as `int(h, 16)` reads them: 4 per hex digit)."""
    if isinstance(phashes, (pa.Array, pa.ChunkedArray)):
        return 4 * max(1, pc.max(pc.utf8_length(phashes)).as_py() or 0) if len(phashes) else 4
    return 4 * max((len(h) for h in phashes), default=1)


_NIBBLE = np.full(256, 255, np.uint8)  # ASCII hex digit -> its value; 255 for any other byte
_NIBBLE[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_NIBBLE[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_NIBBLE[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


def _hex_bits(phashes: list[str] | pa.Array | pa.ChunkedArray, digits: int) -> np.ndarray:
    """(n, 4 * digits) 0/1 bits, most significant first, each hash left-padded with zeros to `digits` hex
    digits (as `int(h, 16)` reads a short one). Parsed from the Arrow buffers in whole arrays: parsing
    3M hashes one `bytes.fromhex` at a time took 6.4 s (bench/dedup.py)."""
    text = fixed_width(phashes, align="right", fill=b"0")
    have = text.dtype.itemsize
    if have > digits:
        raise ValueError(f"a hash has more than {digits} hex digits")
    chars = text.view(np.uint8).reshape(len(text), have)
    if have < digits:
        chars = np.concatenate([np.full((len(text), digits - have), ord("0"), np.uint8), chars], axis=1)
    nibbles = _NIBBLE[chars]
    if (nibbles == 255).any():
        bad = text[np.flatnonzero((nibbles == 255).any(axis=1))[0]]
        raise ValueError(f"not a hex hash: {bad.decode(errors='replace')!r}")
    bits = nibbles[:, :, None] >> np.arange(3, -1, -1, dtype=np.uint8)
    return np.bitwise_and(bits, 1, out=bits).reshape(len(text), 4 * digits)


def _words(bits: np.ndarray) -> np.ndarray:
    """(n, b) 0/1 bits, most significant first -> (n, ceil(b / 64)) uint64, zero-padded on the left."""
    pad = (-bits.shape[1]) % 64
    padded = np.pad(bits, ((0, 0), (pad, 0))) if pad else bits
    packed = np.packbits(padded, axis=1).reshape(bits.shape[0], padded.shape[1] // 64, 8)
    return packed.view(">u8").astype(np.uint64).reshape(bits.shape[0], padded.shape[1] // 64)


def _fold(words: np.ndarray) -> np.ndarray:
    key = words[:, 0].copy()
    for column in range(1, words.shape[1]):
        key = key * _MIX ^ words[:, column]
    return key


def _run_ends(ordered: np.ndarray) -> np.ndarray:
    """For each position of a sorted array, where its run of equal values ends."""
    if not len(ordered):
        return np.zeros(0, np.int64)
    breaks = np.flatnonzero(ordered[1:] != ordered[:-1]) + 1
    bounds = np.concatenate([breaks, [len(ordered)]])
    return np.repeat(bounds, np.diff(np.concatenate([[0], bounds])))


def _unique(found: list[tuple[np.ndarray, np.ndarray]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs found by several bands once, sorted by i then j (j < n)."""
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    i = np.concatenate([a for a, _ in found]).astype(np.int64)
    j = np.concatenate([b for _, b in found]).astype(np.int64)
    codes = np.unique(i * n + j)
    return codes // n, codes % n
