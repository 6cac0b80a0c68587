"""The columnar dedup pass (pipelines/duplicates.py): the same groups from an Arrow table, whatever its string
types, chunks, nulls and row order, as from the definition over dicts; the marks the stage maps receive; the
hex parse of the near-duplicate index (the barrier on a real local Ray: tests/integration/test_dedup_barrier.py)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from latentforge.datasets.columns import codes, first_of_each, fixed_width
from latentforge.pipelines import near_index
from latentforge.pipelines.duplicates import (
    SETTLED,
    Marks,
    duplicates,
    find_duplicates,
    hash_table,
    mark,
    mark_duplicates,
)
from latentforge.pipelines.near_index import HashSet
from latentforge.pipelines.stages.dedup import DedupConfig


def reference(rows: list[dict], cfg: DedupConfig) -> dict[str, tuple[str, str]]:
    """The definition, one row at a time: ok rows with a content hash, best first; exact groups by bytes; then,
    per modality, each unclaimed representative claims every unclaimed one within max_distance; duplicates point
    at the final representative, exact when the bytes are the same."""
    def best_first(row):
        return (not row.get(SETTLED, False), -float(row.get("score_resolution") or 0.0), str(row["id"]))

    live = sorted((r for r in rows if r["status"] == "ok" and r.get("content_sha256")), key=best_first)
    rep = {}
    if cfg.exact:
        first: dict[str, str] = {}
        for r in live:
            rep[r["id"]] = first.setdefault(r["content_sha256"], r["id"])
    survivors = [r for r in live if rep.get(r["id"], r["id"]) == r["id"] and r.get("phash")]
    leader: dict[str, str] = {}
    if cfg.near:
        for r in survivors:
            if r["id"] in leader:
                continue
            leader[r["id"]] = r["id"]
            for s in survivors:
                if s["id"] not in leader and s.get("modality") == r.get("modality") and \
                        (int(r["phash"], 16) ^ int(s["phash"], 16)).bit_count() <= cfg.max_distance:
                    leader[s["id"]] = r["id"]
    sha = {r["id"]: r["content_sha256"] for r in live}
    out = {}
    for r in live:
        exact_rep = rep.get(r["id"], r["id"])
        final = leader.get(exact_rep, exact_rep)
        if final != r["id"]:
            out[r["id"]] = (final, "exact" if exact_rep != r["id"] and sha[final] == sha[r["id"]] else "near")
    return out


def corpus(seed: int, n: int = 120) -> list[dict]:
    """Rows with exact copies, near copies, copies sharing a pHash, ties in score, two modalities, failed rows,
    audio without a pHash, missing scores and a settled row."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        base = int(rng.integers(0, 2**63))
        kind = ("image", "video")[int(rng.integers(2))]
        rows.append({"id": f"r{i:03d}", "status": "ok", "modality": kind, "content_sha256": f"s{i}",
                     "phash": f"{base:016x}", "score_resolution": float(rng.integers(0, 3))})
        if rng.random() < 0.4:  # a near copy
            flipped = base ^ sum(1 << int(b) for b in rng.choice(64, int(rng.integers(1, 7)), replace=False))
            rows.append({**rows[-1], "id": f"n{i:03d}", "content_sha256": f"t{i}", "phash": f"{flipped:016x}"})
        if rng.random() < 0.2:  # an exact copy, and a re-encode with the same pHash
            rows.append({**rows[-1], "id": f"e{i:03d}"})
            rows.append({**rows[-1], "id": f"p{i:03d}", "content_sha256": f"u{i}", "score_resolution": None})
    rows += [{"id": "a1", "status": "ok", "modality": "audio", "content_sha256": "a", "phash": ""},
             {"id": "a2", "status": "ok", "modality": "audio", "content_sha256": "a", "phash": None},
             {"id": "x1", "status": "rejected", "modality": "image", "content_sha256": "s1", "phash": rows[1]["phash"]},
             {"id": "x2", "status": "ok", "modality": "image", "content_sha256": "", "phash": rows[1]["phash"]}]
    rows[5][SETTLED] = True
    return rows


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("cfg", [DedupConfig(), DedupConfig(exact=False), DedupConfig(near=False),
                                 DedupConfig(max_distance=0), DedupConfig(max_distance=9)])
def test_the_columns_give_the_definitions_groups(seed: int, cfg: DedupConfig):
    rows = corpus(seed)
    expected = reference(rows, cfg)
    assert len(expected) >= 10
    assert find_duplicates(rows, cfg) == expected


def test_any_string_type_chunking_row_order_and_missing_columns_give_the_same_groups():
    rows = corpus(7)
    expected = find_duplicates(rows, DedupConfig())
    table = hash_table(rows)
    shuffled = table.take(np.random.default_rng(0).permutation(table.num_rows))
    chunked = pa.concat_tables([shuffled.slice(0, 50), shuffled.slice(50)])  # as Ray Data's blocks come
    large = chunked.cast(pa.schema([(f.name, pa.large_string() if f.type == pa.string() else f.type)
                                    for f in chunked.schema]))  # pandas and polars write large_string
    for variant in (shuffled, chunked, large):
        found = duplicates(variant, DedupConfig())
        ids = variant["id"].to_pylist()
        got = {ids[d]: (ids[r], "exact" if e else "near")
               for d, r, e in zip(found.rows.tolist(), found.representatives.tolist(), found.exact.tolist())}
        assert got == expected
    # a table straight from the scan has no SETTLED column (only earlier runs' rows have one)
    plain = [{k: v for k, v in r.items() if k != SETTLED} for r in rows]
    assert find_duplicates(plain, DedupConfig()) == duplicates_by_id(hash_table(plain).drop_columns([SETTLED]))


def duplicates_by_id(table: pa.Table) -> dict:
    found = duplicates(table, DedupConfig())
    ids = table["id"].to_pylist()
    return {ids[d]: (ids[r], "exact" if e else "near")
            for d, r, e in zip(found.rows.tolist(), found.representatives.tolist(), found.exact.tolist())}


def test_marks_name_the_representative_and_leave_every_other_row_alone():
    table = pa.table({"id": ["img-1", "img-22", "img-333", "x"], "relpath": ["a.png", "b/ü.png", None, "x.png"]})
    from latentforge.pipelines.duplicates import Duplicates

    marks = Marks.of(table, Duplicates(np.array([1, 0]), np.array([2, 3]), np.array([True, False])))
    assert marks.ids.tolist() == [b"img-1", b"img-22"]  # sorted, for the lookup
    batch = {"id": np.array(["img-22", "img-1", "img-2", "img-3333", "zz", "img-333"], dtype=object),
             "status": np.array(["ok"] * 6, dtype=object), "reason": np.array([""] * 6, dtype=object),
             "stage": np.array([""] * 6, dtype=object), "message": np.array([""] * 6, dtype=object)}
    out = mark(batch, marks)
    assert out["status"].tolist() == ["filtered", "filtered", "ok", "ok", "ok", "ok"]  # prefixes are no match
    assert out["reason"].tolist()[:2] == ["duplicate_exact", "duplicate_near"]
    assert out["duplicate_of"].tolist() == ["img-333", "x", "", "", "", ""]
    assert out["message"].tolist()[:2] == ["exact duplicate of img-333", "near duplicate of x.png (x)"]
    assert batch["status"].tolist() == ["ok"] * 6  # the batch given is not changed
    assert mark_duplicates(batch, {})["status"].tolist() == ["ok"] * 6
    assert mark(batch, Marks.of(table, Duplicates(*(np.zeros(0, np.int64),) * 2, np.zeros(0, bool))))[
        "duplicate_of"].tolist() == [""] * 6


def test_the_index_parses_hex_from_lists_and_arrow_alike():
    hashes = ["0f", "ABC", "1", "fff0", "00ff"]
    for given in (hashes, pa.array(hashes), pa.chunked_array([hashes[:2], hashes[2:]], pa.large_string())):
        assert near_index.width(given) == 16
        bits = near_index._hex_bits(given, 4)
        assert [int("".join(map(str, row)), 2) for row in bits.tolist()] == [int(h, 16) for h in hashes]
    pairs = HashSet(pa.array(hashes), 4).pairs()
    assert set(zip(*map(np.ndarray.tolist, pairs))) == {(0, 2), (0, 4)}  # 0f-1: 3 bits, 0f-ff: 4, 1-ff: 7
    with pytest.raises(ValueError, match="not a hex hash"):
        HashSet(["0g"], 2)
    with pytest.raises(ValueError, match="more than"):
        near_index._hex_bits(["12345"], 4)


def test_columns_helpers():
    values = pa.chunked_array([["b", None, "a"], ["b", "ä"]])
    assert fixed_width(values).tolist() == [b"b", b"", b"a", b"b", "ä".encode()]
    assert fixed_width(["7", "ab"], align="right", fill=b"0").tolist() == [b"07", b"ab"]
    assert first_of_each(codes(values)).tolist() == [0, 1, 2, 0, 4]
    assert first_of_each(np.zeros(0, np.int64)).tolist() == []
