"""The driver's global dedup pass at corpus scale: near-duplicate search in numpy vs the previous Python index.

    .venv/bin/python bench/dedup.py [--rows 100000 300000] [--baseline-max 300000] [--max-distance 4]

For each size, builds the rows `find_duplicates` gets at the scan's barrier (id, status, modality, content
hash, 64-bit pHash, resolution score): random hashes, plus 10% near copies of them (1-6 bits flipped) and 5%
exact copies. Times, in one process, `find_duplicates` as it is now (`pipelines/near_index.py`) and the same
pass with the previous near-duplicate search (a dict of band buckets, Python sets of candidates and a greedy
walk over them; copied below as the baseline), checks both mark the same duplicates with the same
representatives, and prints seconds and the ratio. Random hashes are the banding's easy case: real pHashes
cluster, and clusters fill band buckets, which costs both versions more candidates.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from itertools import pairwise

import numpy as np

from latentforge.pipelines.stages import dedup
from latentforge.pipelines.stages.dedup import DedupConfig, _preference, find_duplicates


def corpus(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    values = [int.from_bytes(rng.bytes(8), "big") for _ in range(n)]
    rows = [{"id": f"r{i:08d}", "status": "ok", "modality": "image", "content_sha256": f"s{i}",
             "phash": f"{v:016x}", "score_resolution": float(rng.random())} for i, v in enumerate(values)]
    for i in range(n // 10):  # near copies
        value = values[int(rng.integers(n))]
        for bit in rng.choice(64, size=int(rng.integers(1, 7)), replace=False):
            value ^= 1 << int(bit)
        rows.append({"id": f"n{i:08d}", "status": "ok", "modality": "image", "content_sha256": f"n{i}",
                     "phash": f"{value:016x}", "score_resolution": float(rng.random())})
    rows += [{**rows[int(rng.integers(n))], "id": f"e{i:08d}"} for i in range(n // 20)]  # exact copies
    return rows


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


def timed(rows: list[dict], cfg: DedupConfig) -> tuple[float, dict]:
    t0 = time.perf_counter()
    out = find_duplicates(rows, cfg)
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 300_000], help="random hashes per size")
    parser.add_argument("--baseline-max", type=int, default=300_000,
                        help="largest size the baseline runs at (it grows as n^2: ~35 s at 300k on 2 cores)")
    parser.add_argument("--max-distance", type=int, default=4)
    args = parser.parse_args()
    cfg = DedupConfig(max_distance=args.max_distance)
    for n in args.rows:
        rows = corpus(n)
        now_s, now = timed(rows, cfg)
        result = {"hashes": n, "rows": len(rows), "duplicates": len(now), "numpy_s": round(now_s, 2)}
        if n <= args.baseline_max:
            current = dedup._near_groups
            dedup._near_groups = previous_near_groups  # find_duplicates's near pass, the rest unchanged
            try:
                before_s, before = timed(rows, cfg)
            finally:
                dedup._near_groups = current
            if before != now:
                raise SystemExit(f"the two searches disagree at {n} hashes")
            result.update(previous_s=round(before_s, 2), speedup=round(before_s / now_s, 1))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
