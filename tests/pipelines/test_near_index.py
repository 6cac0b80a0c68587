"""The near-duplicate search in numpy (pipelines/near_index.py) against brute force: every pair within the
distance at every hash width the config allows, across two sets, in chunks, and the greedy groups dedup and
readmission build on it."""
from __future__ import annotations

import numpy as np
import pytest

from latentforge.pipelines import meta, near_index
from latentforge.pipelines.near_index import HashSet
from latentforge.pipelines.readmit import Readmission, _to_kept
from latentforge.pipelines.duplicates import SETTLED, _near_groups, _preference


def planted(rng: np.random.Generator, bits: int, n: int, max_distance: int) -> list[str]:
    """n random hashes of `bits` bits plus a near copy of half of them at 0 .. max_distance + 2 bits, as hex."""
    values = [int.from_bytes(rng.bytes(bits // 8 + 1), "big") % (1 << bits) for _ in range(n)]
    for base in values[: n // 2]:
        flips = rng.choice(bits, size=int(rng.integers(0, max_distance + 3)), replace=False)
        values.append(base ^ sum(1 << int(b) for b in flips))
    return [f"{v:0{(bits + 3) // 4}x}" for v in values]


def brute(hashes: list[str], max_distance: int) -> set[tuple[int, int]]:
    v = [int(h, 16) for h in hashes]
    return {(i, j) for i in range(len(v)) for j in range(i + 1, len(v)) if (v[i] ^ v[j]).bit_count() <= max_distance}


def as_set(pairs: tuple[np.ndarray, np.ndarray]) -> set[tuple[int, int]]:
    return set(zip(pairs[0].tolist(), pairs[1].tolist()))


# hash_size 4..16 gives 16..256 bits; 28 = a 25-bit hash in 7 hex digits; bands over 64 bits fold into one key
@pytest.mark.parametrize("bits", [16, 28, 64, 100, 256])
@pytest.mark.parametrize("max_distance", [0, 1, 4, 7])
def test_every_pair_within_the_distance_and_no_other(bits: int, max_distance: int):
    rng = np.random.default_rng(bits * 10 + max_distance)
    hashes = planted(rng, bits, 160, max_distance)
    expected = brute(hashes, max_distance)
    assert len(expected) >= 15  # the plants within reach
    for agree in (1, 2, 3):  # bands that must match: 1 of d + 1, 2 of d + 2, ... (chosen by size otherwise)
        pairs = HashSet(hashes, max_distance, agree=agree).pairs()
        assert as_set(pairs) == expected, agree
        assert list(zip(*pairs)) == sorted(zip(*pairs))  # sorted by i, then j: what the greedy walk needs
        kept, rest = hashes[:100], hashes[100:]
        across = HashSet(rest, max_distance, bits, agree).pairs_with(HashSet(kept, max_distance, bits, agree))
        assert as_set(across) == {(j - 100, i) for i, j in expected if i < 100 <= j}, agree


def test_the_bands_that_must_agree_grow_with_the_corpus():
    """More agreeing bands cost more sorts and save candidates: worth it only for many hashes."""
    assert near_index.agreeing_bands(1_000, 64, 4) == 1
    assert near_index.agreeing_bands(3_000_000, 64, 4) == 2
    assert near_index.agreeing_bands(3_000_000, 256, 4) == 1  # 51-bit bands already leave few candidates
    assert near_index.agreeing_bands(10, 4, 4) == 1  # no room for more bands than bits


def test_long_runs_and_chunks_lose_no_pair(monkeypatch):
    """A run of 40 equal hashes gives all its 780 pairs; across two sets, candidates checked in chunks of any
    size (one row's run longer than a chunk included) give the same pairs."""
    rng = np.random.default_rng(5)
    hashes = ["00ff00ff00ff00ff"] * 40 + planted(rng, 64, 120, 4)
    expected = brute(hashes, 4)
    assert as_set(HashSet(hashes, 4).pairs()) == expected
    assert {(i, j) for i, j in expected if j < 40} == {(i, j) for i in range(40) for j in range(i + 1, 40)}
    across = {(j - 100, i) for i, j in expected if i < 100 <= j}
    for chunk in (1, 7, 1000):
        monkeypatch.setattr(near_index, "_CHUNK", chunk)
        assert as_set(HashSet(hashes[100:], 4).pairs_with(HashSet(hashes[:100], 4))) == across


def test_empty_and_single_sets():
    assert as_set(HashSet([], 4, bits=64).pairs()) == set()
    assert as_set(HashSet(["ab" * 8], 4).pairs()) == set()
    assert as_set(HashSet(["ab" * 8], 4).pairs_with(HashSet([], 4, bits=64))) == set()
    with pytest.raises(ValueError, match="widths, distances or bands"):
        HashSet(["ab" * 8], 4).pairs_with(HashSet(["ab" * 4], 4))


def greedy_reference(rows: list[dict], max_distance: int) -> dict[str, tuple[str, str]]:
    """The greedy leaders by definition, over all pairs: each unclaimed row, best first, claims every unclaimed
    row within max_distance."""
    rows = sorted(rows, key=_preference)
    values = [int(r["phash"], 16) for r in rows]
    claimed, dups = [False] * len(rows), {}
    for i in range(len(rows)):
        if claimed[i]:
            continue
        claimed[i] = True
        for j in range(len(rows)):
            if not claimed[j] and (values[i] ^ values[j]).bit_count() <= max_distance:
                claimed[j] = True
                dups[rows[j]["id"]] = (rows[i]["id"], "near")
    return dups


@pytest.mark.parametrize("seed", range(4))
def test_greedy_groups_match_their_definition(seed: int):
    rng = np.random.default_rng(seed)
    hashes = planted(rng, 64, 150, 6)
    hashes += [hashes[int(k)] for k in rng.integers(0, len(hashes), 30)]  # chains and ties: equal hashes
    rows = [{"id": f"r{i:03d}", "phash": h, "score_resolution": float(rng.integers(0, 3)),
             SETTLED: bool(rng.random() < 0.1)} for i, h in enumerate(hashes)]
    expected = greedy_reference(rows, 6)
    assert len(expected) >= 40
    assert _near_groups(rows, 6) == expected


def to_kept(pool: list[dict], kept: list[dict], max_distance: int, plan: Readmission) -> list[dict]:
    """readmit._to_kept with the kept rows as the table it searches (all of them kept), the rows found by id."""
    by_id: dict[str, dict] = {}
    left = _to_kept(pool, meta.from_rows(kept), np.arange(len(kept)), max_distance, plan, by_id)
    assert set(by_id) == {rep for rep, _ in plan.repoint.values()}
    return left


def test_readmission_points_a_duplicate_at_the_best_kept_row_within_reach():
    rng = np.random.default_rng(9)
    hashes = planted(rng, 64, 120, 4)
    kept = [{"id": f"k{i:03d}", "phash": h, "score_resolution": float(rng.integers(0, 4))}
            for i, h in enumerate(hashes[:100])]
    pool = [{"id": f"p{i:03d}", "phash": h} for i, h in enumerate(hashes[100:])] + [{"id": "audio", "phash": ""}]
    plan = Readmission()
    left = to_kept(pool, kept, 4, plan)
    best = sorted(kept, key=_preference)
    for row in pool:
        within = [k for k in best if row["phash"] and (int(k["phash"], 16) ^ int(row["phash"], 16)).bit_count() <= 4]
        if within:
            assert plan.repoint[row["id"]] == (within[0]["id"], "near") and row not in left
        else:
            assert row["id"] not in plan.repoint and row in left
    assert 5 <= len(plan.repoint) < len(pool) - 5


def test_copies_of_one_hash_are_grouped_before_the_search(monkeypatch):
    """600 rows with one pHash (re-encoded copies of one picture) and near copies of it: the same groups as the
    definition, with the index given each distinct hash once (no pair inside a group is listed)."""
    from latentforge.pipelines import duplicates as dedup

    rng = np.random.default_rng(11)
    popular = "0f0f0f0f33cc33cc"
    near = [f"{int(popular, 16) ^ (1 << int(b)):016x}" for b in rng.choice(64, 5, replace=False)]
    hashes = [popular] * 600 + near * 3 + planted(rng, 64, 60, 4)
    rows = [{"id": f"r{i:04d}", "phash": h, "score_resolution": float(rng.integers(0, 5))}
            for i, h in enumerate(hashes)]
    seen = []

    class Spy(HashSet):
        def __init__(self, phashes, *args, **kw):
            seen.append(len(phashes))
            super().__init__(phashes, *args, **kw)

    monkeypatch.setattr(dedup, "HashSet", Spy)
    assert _near_groups(rows, 4) == greedy_reference(rows, 4)
    assert seen == [len(set(hashes))]
    kept, pool = rows[:300] + rows[615:650], [{"id": f"p{i}", "phash": h} for i, h in enumerate(hashes[600:700])]
    plan = Readmission()
    to_kept(pool, kept, 4, plan)
    best = sorted(kept, key=_preference)
    for row in pool:
        within = [k for k in best if (int(k["phash"], 16) ^ int(row["phash"], 16)).bit_count() <= 4]
        assert plan.repoint.get(row["id"]) == ((within[0]["id"], "near") if within else None)
