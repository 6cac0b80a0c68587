"""The driver's global dedup pass at corpus scale: columns (now) vs one dict per row (the previous code) vs the first
Python index.

    .venv/bin/python bench/dedup.py [--rows 100000 300000] [--dicts-max 3000000] [--baseline-max 300000]

For each size, builds the hash columns the scan's barrier gets (id, status, modality, content hash, 64-bit pHash,
resolution score) as an Arrow table, as Ray Data's blocks hold them: random hashes, plus 10% near copies of them
(1-6 bits flipped) and 5% exact copies. Times, in one process:
- columns (now): `duplicates.duplicates` on the table, then `Marks.of` (what the marking map receives);
- dicts (the code before, copied below): the rows as one dict each (`table.to_pylist()`, what `take_all`
  gave the driver), the groups in Python over them, the near search in numpy (`near_index`, hex parsed one
  `bytes.fromhex` at a time), the duplicates and their messages as dicts;
- first index (up to --baseline-max): the dict version with the first near-duplicate search (a dict of band
  buckets, Python sets of candidates), which grows as n^2.
Checks every way marks the same duplicates with the same representatives, and prints seconds, what the driver
holds for the rows (the dicts, or the table) and the peak of Python and Arrow allocations during each pass.
Random hashes are the banding's easy case: real pHashes cluster, which costs every version more candidates.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
import tracemalloc
from collections import defaultdict
from itertools import pairwise

import numpy as np
import pyarrow as pa

from latentforge.pipelines import near_index
from latentforge.pipelines.duplicates import HASH_COLUMNS, Marks, duplicates
from latentforge.pipelines.stages.dedup import DedupConfig


def corpus(n: int, seed: int = 0) -> list[dict]:
    return table_of(n, seed).to_pylist()


def table_of(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2) + rng.integers(0, 2, n).astype(
        np.uint64)
    copies = rng.integers(0, n, n // 10)
    near = values[copies].copy()
    for k in range(len(near)):  # 1-6 bits flipped
        for bit in rng.choice(64, size=int(rng.integers(1, 7)), replace=False):
            near[k] ^= np.uint64(1) << np.uint64(bit)
    ids = [f"r{i:08d}" for i in range(n)] + [f"n{i:08d}" for i in range(len(near))]
    shas = [f"s{i}" for i in range(n)] + [f"n{i}" for i in range(len(near))]
    hashes = np.concatenate([values, near])
    scores = rng.random(len(hashes))
    exact = rng.integers(0, n, n // 20)  # exact copies: another id, the same hash columns
    ids += [f"e{i:08d}" for i in range(len(exact))]
    shas += [shas[int(i)] for i in exact]
    hashes, scores = np.concatenate([hashes, hashes[exact]]), np.concatenate([scores, scores[exact]])
    m = len(ids)
    return pa.table({"id": ids, "relpath": [f"images/{i}.jpg" for i in ids], "status": ["ok"] * m,
                     "modality": ["image"] * m, "content_sha256": shas,
                     "phash": [f"{int(v):016x}" for v in hashes], "score_resolution": scores}).select(HASH_COLUMNS)


# ---------------------------------------------------------------- the code before: one dict per row


def _preference(row: dict) -> tuple[bool, float, str]:
    return (not row.get("settled", False), -float(row.get("score_resolution", 0.0) or 0.0), str(row["id"]))


class FromHexHashSet(near_index.HashSet):
    """near_index.HashSet as it was: its previous parse (one `bytes.fromhex` per hash) and every band key built
    and held up front."""

    def __init__(self, phashes: list[str], max_distance: int):
        self.n, self.max_distance = len(phashes), max_distance
        self.bits = near_index.width(phashes)
        self.agree = near_index.agreeing_bands(self.n, self.bits, max_distance)
        digits = self.bits // 4 + (self.bits // 4) % 2
        raw = np.frombuffer(b"".join(bytes.fromhex(h.rjust(digits, "0")) for h in phashes), dtype=np.uint8)
        unpacked = np.unpackbits(raw.reshape(self.n, digits // 2), axis=1)[:, -self.bits:]
        words = near_index._words(unpacked)
        self.columns = [np.ascontiguousarray(column) for column in words.T]
        bands = max_distance + self.agree
        edges = [round(i * self.bits / bands) for i in range(bands + 1)]
        cuts = list(zip(edges, edges[1:]))
        self.held = [near_index._fold(near_index._words(np.concatenate([unpacked[:, a:b] for a, b in chosen], axis=1)))
                     for chosen in itertools.combinations(cuts, self.agree)]

    def keys(self):
        return iter(self.held)


def dict_exact_groups(rows: list[dict]) -> dict[str, tuple[str, str]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["content_sha256"]].append(row)
    dups = {}
    for members in groups.values():
        if len(members) == 1:
            continue
        best, *rest = sorted(members, key=_preference)
        dups.update({r["id"]: (best["id"], "exact") for r in rest})
    return dups


def dict_near_groups(rows: list[dict], max_distance: int) -> dict[str, tuple[str, str]]:
    rows = sorted(rows, key=_preference)
    hashes = [r["phash"] for r in rows]
    distinct = list(dict.fromkeys(hashes))
    number = {h: g for g, h in enumerate(distinct)}
    group_of = np.fromiter((number[h] for h in hashes), dtype=np.int64, count=len(hashes))
    by_group = np.argsort(group_of, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(group_of, minlength=len(distinct)))])
    first, second = FromHexHashSet(distinct, max_distance).pairs()
    claimed, dups = np.zeros(len(distinct), dtype=bool), {}
    leaders, starts = np.unique(first, return_index=True)
    ends = np.append(starts[1:], len(first))
    follows = {g: second[lo:hi] for g, lo, hi in zip(leaders.tolist(), starts.tolist(), ends.tolist())}
    copies = np.flatnonzero(np.diff(bounds) > 1)
    for group in np.union1d(leaders, copies).tolist():
        if claimed[group]:
            continue
        later = follows.get(group, second[:0])
        followers = later[~claimed[later]]
        claimed[followers] = True
        indices = by_group[bounds[group]:bounds[group + 1]].tolist()
        for g in followers.tolist():
            indices += by_group[bounds[g]:bounds[g + 1]].tolist()
        leader = rows[indices[0]]["id"]
        for j in indices[1:]:
            dups[rows[j]["id"]] = (leader, "near")
    return dups


def dict_find_duplicates(rows: list[dict], cfg: DedupConfig, near_groups=dict_near_groups) -> dict:
    live = [r for r in rows if r["status"] == "ok" and r.get("content_sha256")]
    exact = dict_exact_groups(live) if cfg.exact else {}
    survivors = [r for r in live if r["id"] not in exact]
    near: dict[str, tuple[str, str]] = {}
    if cfg.near:
        by_modality: dict[str, list[dict]] = defaultdict(list)
        for r in survivors:
            if r.get("phash"):
                by_modality[r.get("modality", "")].append(r)
        for group in by_modality.values():
            near.update(near_groups(group, cfg.max_distance))
    sha = {r["id"]: r["content_sha256"] for r in live}
    out = dict(near)
    for dup, (rep, _) in exact.items():
        final = near.get(rep, (rep, "exact"))[0]
        out[dup] = (final, "exact" if sha[dup] == sha[final] else "near")
    return out


def dict_pass(table: pa.Table, cfg: DedupConfig, near_groups=dict_near_groups) -> dict:
    """The barrier as it was: the rows as dicts, the groups, and the notes the marking map received."""
    rows = table.to_pylist()
    dups = dict_find_duplicates(rows, cfg, near_groups)
    where = {h["id"]: h["relpath"] for h in rows}
    notes = {d: f"{kind} duplicate of {where[rep]} ({rep})" for d, (rep, kind) in dups.items()}
    del notes
    return dups


def columns_pass(table: pa.Table, cfg: DedupConfig) -> dict:
    found = duplicates(table, cfg)
    marks = Marks.of(table, found)
    return {i.decode(): (r.decode(), "exact" if e else "near")
            for i, r, e in zip(marks.ids.tolist(), marks.representatives.tolist(), marks.exact.tolist())}


# ---------------------------------------------------------------- the previous near-duplicate search (baseline)

class PreviousBandIndex:
    def __init__(self, phashes: list[str], max_distance: int):
        width = 4 * max(len(h) for h in phashes)
        self.values = [int(h, 16) for h in phashes]
        self.bits = [f"{v:0{width}b}" for v in self.values]
        edges = [round(i * width / (max_distance + 1)) for i in range(max_distance + 2)]
        self.slices = [slice(a, b) for a, b in pairwise(edges)]
        self.max_distance = max_distance
        self.buckets: dict[tuple[int, str], list[int]] = defaultdict(list)
        for i, b in enumerate(self.bits):
            for band, s in enumerate(self.slices):
                self.buckets[band, b[s]].append(i)

    def candidates(self, i: int) -> set[int]:
        return {j for band, s in enumerate(self.slices) for j in self.buckets[band, self.bits[i][s]] if j != i}

    def close(self, i: int, j: int) -> bool:
        return (self.values[i] ^ self.values[j]).bit_count() <= self.max_distance


def previous_near_groups(rows: list[dict], max_distance: int) -> dict[str, tuple[str, str]]:
    rows = sorted(rows, key=_preference)
    index = PreviousBandIndex([r["phash"] for r in rows], max_distance)
    claimed, dups = [False] * len(rows), {}
    for i, leader in enumerate(rows):
        if claimed[i]:
            continue
        claimed[i] = True
        for j in sorted(index.candidates(i)):
            if not claimed[j] and index.close(i, j):
                claimed[j] = True
                dups[rows[j]["id"]] = (leader["id"], "near")
    return dups


def measured(fn, *args) -> tuple[float, float, dict]:
    """(seconds, peak MB of Python and Arrow allocations above the start, result): timed in a first call, the
    peak taken in a second one under tracemalloc (which slows Python's allocations, the dicts' more than numpy's)."""
    t0 = time.perf_counter()
    out = fn(*args)
    seconds = time.perf_counter() - t0
    pool = pa.default_memory_pool()
    arrow_start = pool.bytes_allocated()
    tracemalloc.start()
    fn(*args)
    _, python_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return seconds, (python_peak + max(0, pool.max_memory() - arrow_start)) / 2**20, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 300_000], help="random hashes per size")
    parser.add_argument("--dicts-max", type=int, default=3_000_000,
                        help="largest size the dict version runs at (~1.5 KB of driver memory a row)")
    parser.add_argument("--baseline-max", type=int, default=300_000,
                        help="largest size the first index runs at (it grows as n^2: ~35 s at 300k on 2 cores)")
    parser.add_argument("--max-distance", type=int, default=4)
    args = parser.parse_args()
    cfg = DedupConfig(max_distance=args.max_distance)
    for n in args.rows:
        table = table_of(n)
        now_s, now_mb, now = measured(columns_pass, table, cfg)
        result = {"hashes": n, "rows": table.num_rows, "duplicates": len(now), "columns_s": round(now_s, 2),
                  "columns_peak_mb": round(now_mb, 1), "table_mb": round(table.nbytes / 2**20, 1)}
        if n <= args.dicts_max:
            tracemalloc.start()
            held = table.to_pylist()
            result["dicts_held_mb"] = round(tracemalloc.get_traced_memory()[0] / 2**20, 1)
            tracemalloc.stop()
            assert len(held) == table.num_rows
            del held
            before_s, before_mb, before = measured(dict_pass, table, cfg)
            if before != now:
                raise SystemExit(f"dicts and columns disagree at {n} hashes")
            result.update(dicts_s=round(before_s, 2), dicts_peak_mb=round(before_mb, 1),
                          speedup=round(before_s / now_s, 2), memory_ratio=round(before_mb / now_mb, 1))
        if n <= args.baseline_max:
            first_s, first = time.perf_counter(), dict_pass(table, cfg, previous_near_groups)
            first_s = time.perf_counter() - first_s
            if first != now:
                raise SystemExit(f"the first index disagrees at {n} hashes")
            result.update(first_index_s=round(first_s, 2), speedup_vs_first=round(first_s / now_s, 1))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
