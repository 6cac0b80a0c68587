"""The global dedup pass: exact and near-duplicate groups over every row's hashes, on the driver, in columns.

Grouping needs every row's hash at once, so it runs on the driver at the scan's barrier while the cluster waits
(`ContentHash` in stages/dedup.py wrote the hashes). It works on an Arrow table of the hash columns, as Ray
Data's blocks hold them, and numpy arrays of positions: the first version took the rows as one dict each
(`take_all`): ~0.6 KB of driver memory a row held (7 GB at ten million) and ~1.2 KB at the pass's peak, which
walked them in Python (bench/dedup.py).
`find_duplicates` and the `_*_groups` functions keep the dict interface for readmission and small callers.

Preference, best first: a SETTLED row (an earlier run's representative that stays, curate.dedup), then the
highest resolution score, then the smallest id (deterministic across runs).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from latentforge.datasets.columns import codes, first_of_each, fixed_width, large_strings
from latentforge.pipelines.meta import strings
from latentforge.pipelines.near_index import HashSet
from latentforge.pipelines.stages.dedup import DedupConfig

SETTLED = "settled"  # a hash row of an earlier run's representative that stays (curate.dedup): preferred
HASH_COLUMNS = ["id", "relpath", "status", "modality", "content_sha256", "phash", "score_resolution"]
_STRINGS = ("id", "relpath", "status", "modality", "content_sha256", "phash")


@dataclass
class Duplicates:
    """Each duplicate's row, its representative's row (positions in the table searched) and whether it is an
    exact copy of it (the same bytes) rather than a near one."""

    rows: np.ndarray
    representatives: np.ndarray
    exact: np.ndarray

    def kinds(self) -> list[str]:
        return ["exact" if e else "near" for e in self.exact.tolist()]


def hash_table(rows: list[dict]) -> pa.Table:
    """The hash columns of rows given as dicts (missing values: "", 0.0, False)."""
    out = {k: pa.array([r.get(k) for r in rows], pa.string() if k != "id" else None) for k in _STRINGS}
    out["score_resolution"] = pa.array([r.get("score_resolution") for r in rows], pa.float64())
    out[SETTLED] = pa.array([bool(r.get(SETTLED, False)) for r in rows], pa.bool_())
    return pa.table(out)


def voters(done: pa.Table, later_stages: set[str], settled: bool = False) -> pa.Table:
    """The hash columns of finished rows (metadata: pipelines/meta.py) as dedup saw them: ok where a stage in
    `later_stages` (after dedup) or dedup filtered them, and with `settled` (curate.dedup) marked SETTLED where
    they were representatives, their duplicates left out."""
    if not done.num_rows:
        return hash_table([]).select(HASH_COLUMNS + [SETTLED])
    duplicate = pc.not_equal(strings(done, "duplicate_of"), "")
    if settled:  # a settled job's duplicates do not vote
        done = done.filter(pc.invert(duplicate))
        duplicate = pc.not_equal(strings(done, "duplicate_of"), "")
    later = pa.array(sorted(set(later_stages) | {"dedup"}), pa.string())
    status = strings(done, "status")
    status = pc.if_else(pc.or_(pc.equal(status, "ok"), pc.is_in(strings(done, "stage"), value_set=later)),
                        "ok", status)
    columns = {k: strings(done, k) for k in HASH_COLUMNS if k != "score_resolution"}
    score = (done["score_resolution"].cast(pa.float64()) if "score_resolution" in done.column_names
             else pa.nulls(done.num_rows, pa.float64()))
    marked = pc.and_(pc.equal(status, "ok"), pc.invert(duplicate)) if settled else pa.array(
        np.zeros(done.num_rows, bool))
    return pa.table({**columns, "status": status, "score_resolution": score, SETTLED: marked})


def preference_order(table: pa.Table) -> np.ndarray:
    """The table's positions, best first (see the module)."""
    n = table.num_rows
    settled = table[SETTLED].fill_null(False) if SETTLED in table.column_names else pa.array(np.zeros(n, bool))
    score = (table["score_resolution"].cast(pa.float64()).fill_null(0.0) if "score_resolution" in table.column_names
             else pa.array(np.zeros(n)))
    ids = large_strings(table["id"].cast(pa.string()))
    keys = pa.table({"settled": settled, "score": score, "id": ids})
    return pc.sort_indices(keys, sort_keys=[("settled", "descending"), ("score", "descending"),
                                            ("id", "ascending")]).to_numpy()


def duplicates(table: pa.Table, cfg: DedupConfig) -> Duplicates:
    """Over the ok rows of a whole job (columns: id, status, modality, content_sha256, phash, optionally
    score_resolution and SETTLED). Exact groups collapse first; their representatives then meet near
    duplicates of the same modality (`near_leaders`). Every duplicate points at its final representative
    (never at another duplicate), exact when its bytes equal the representative's."""
    none = Duplicates(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool))
    if not cfg.enabled or not table.num_rows:
        return none
    sha = large_strings(table["content_sha256"])
    live = np.flatnonzero(pc.and_(pc.equal(large_strings(table["status"]), "ok"),
                                  pc.not_equal(sha, "")).to_numpy(zero_copy_only=False))
    if not len(live):
        return none
    ranked = table.select([c for c in ("id", "score_resolution", SETTLED) if c in table.column_names])
    order = live[preference_order(ranked.take(live))]  # table positions, best first
    position = np.arange(len(order))
    sha_codes = codes(sha.take(order))
    exact_rep = first_of_each(sha_codes) if cfg.exact else position  # each one's exact representative
    near_rep = position.copy()
    if cfg.near:
        phashes = large_strings(table["phash"]).take(order)
        hashed = (exact_rep == position) & pc.not_equal(phashes, "").to_numpy(zero_copy_only=False)
        modality = codes(large_strings(table["modality"]).take(order))
        for kind in np.unique(modality[hashed]).tolist():
            group = np.flatnonzero(hashed & (modality == kind))
            near_rep[group] = group[near_leaders(phashes.take(group), cfg.max_distance)]
    final = near_rep[exact_rep]
    dup = np.flatnonzero(final != position)
    exact = (exact_rep[dup] != dup) & (sha_codes[dup] == sha_codes[final[dup]])
    return Duplicates(order[dup], order[final[dup]], exact)


def near_leaders(phashes: pa.Array, max_distance: int) -> np.ndarray:
    """Greedy leaders over hashes given best first: each unclaimed hash claims all unclaimed ones within
    max_distance of it. Returns, for each position, its leader's (itself when it leads).

    Leaders rather than connected components, so a chain of small steps cannot pull in a row far from its
    representative; as a consequence no two representatives are within max_distance of each other. A row's
    earlier neighbours have all been claimed or led by the time its turn comes, so only its later ones count:
    the pairs (i < j) in preference order, walked once.

    Rows with the same pHash (re-encoded or resized copies: thousands of one popular picture in a web crawl) are
    one group: the leader of a group is its first row, a leader claims all of a group at once, and the walk runs
    over distinct hashes in the order of each one's best row, so no pair inside a group is ever listed (10k
    copies would be 5e7 pairs per key).
    """
    hash_codes = codes(phashes)
    first = first_of_each(hash_codes)  # each row's group, named by the group's best row
    starts = np.unique(first)  # the groups' best rows, in order: group g starts at starts[g]
    group_of = np.searchsorted(starts, first)
    pair_first, pair_second = HashSet(phashes.take(starts), max_distance).pairs()
    leader, claimed = np.arange(len(starts)), np.zeros(len(starts), dtype=bool)
    leaders, begins = np.unique(pair_first, return_index=True)
    ends = np.append(begins[1:], len(pair_first))
    for group, lo, hi in zip(leaders.tolist(), begins.tolist(), ends.tolist()):
        if claimed[group]:
            continue
        later = pair_second[lo:hi]
        followers = later[~claimed[later]]
        claimed[followers] = True
        leader[followers] = group
    return starts[leader[group_of]]


def find_duplicates(rows: list[dict], cfg: DedupConfig) -> dict[str, tuple[str, str]]:
    """`duplicates` of rows given as dicts: {duplicate id: (representative id, "exact" | "near")}."""
    table = hash_table(rows)
    found = duplicates(table, cfg)
    ids = table["id"].to_pylist()
    return {ids[d]: (ids[r], kind) for d, r, kind in zip(found.rows.tolist(), found.representatives.tolist(),
                                                         found.kinds())}


def _preference(row: dict) -> tuple[bool, float, str]:
    """`preference_order`'s sort key for one row as a dict."""
    return (not row.get(SETTLED, False), -float(row.get("score_resolution", 0.0) or 0.0), str(row["id"]))


def _exact_groups(rows: list[dict]) -> dict[str, tuple[str, str]]:
    """{id: (best id, "exact")} for every row but the best of each content hash (whatever their status)."""
    table = hash_table(rows)
    order = preference_order(table)
    best = first_of_each(codes(table["content_sha256"].take(order)))
    ids = table["id"].take(order).to_pylist()
    return {ids[i]: (ids[b], "exact") for i, b in enumerate(best.tolist()) if b != i}


def _near_groups(rows: list[dict], max_distance: int) -> dict[str, tuple[str, str]]:
    """{id: (leader id, "near")} of `near_leaders` over rows that all have a pHash."""
    table = hash_table(rows)
    order = preference_order(table)
    leads = near_leaders(large_strings(table["phash"]).take(order), max_distance)
    ids = table["id"].take(order).to_pylist()
    return {ids[i]: (ids[b], "near") for i, b in enumerate(leads.tolist()) if b != i}


def near_pairs(phashes: list[str], max_distance: int) -> set[tuple[int, int]]:
    """All index pairs (i < j) whose hashes are within max_distance bits (`near_index`). Empty hashes (audio,
    flat pictures) pair with nothing."""
    where = [i for i, h in enumerate(phashes) if h]
    if not where:
        return set()
    first, second = HashSet([phashes[i] for i in where], max_distance).pairs()
    return {(where[i], where[j]) for i, j in zip(first.tolist(), second.tolist())}


# ---------------------------------------------------------------- marking (in the stage maps after the barrier)


@dataclass
class Marks:
    """The duplicates as the first map after the barrier marks them: ids sorted, as fixed-width bytes (numpy
    arrays travel to every worker without a Python object per value; a dict of a million duplicates was a
    million keys to unpickle in each actor)."""

    ids: np.ndarray  # S: duplicate ids, sorted
    representatives: np.ndarray  # S: each one's representative id
    paths: np.ndarray  # S: the representative's relpath ("": unknown)
    exact: np.ndarray  # bool

    @classmethod
    def of(cls, table: pa.Table, found: Duplicates) -> Marks:
        names = table["id"].cast(pa.string())
        ids = fixed_width(names.take(found.rows))
        order = np.argsort(ids, kind="stable")
        reps = names.take(found.representatives)
        paths = (table["relpath"].take(found.representatives) if "relpath" in table.column_names
                 else pa.array([""] * len(found.rows)))
        return cls(ids[order], fixed_width(reps)[order], fixed_width(paths)[order], found.exact[order])

    @classmethod
    def of_dict(cls, dups: dict[str, tuple[str, str]]) -> Marks:
        table = pa.table({"id": pa.array(list(dups) + [rep for rep, _ in dups.values()], pa.string())})
        n = len(dups)
        exact = np.array([kind == "exact" for _, kind in dups.values()], dtype=bool)
        return cls.of(table, Duplicates(np.arange(n), np.arange(n, 2 * n), exact))

    def find(self, ids) -> np.ndarray:
        """Each id's position among the duplicates, -1 for a row that is none."""
        keys = [str(i).encode() for i in ids]
        out = np.full(len(keys), -1, np.int64)
        if not len(self.ids) or not keys:
            return out
        width = self.ids.dtype.itemsize
        fits = np.flatnonzero([len(k) <= width for k in keys])  # a longer id is no duplicate's
        probe = np.array([keys[i] for i in fits], dtype=f"S{width}")
        at = np.minimum(np.searchsorted(self.ids, probe), len(self.ids) - 1)
        hit = self.ids[at] == probe
        out[fits[hit]] = at[hit]
        return out


def mark(batch: dict[str, np.ndarray], marks: Marks) -> dict[str, np.ndarray]:
    """The batch with `duplicate_of` ("" unless a duplicate); duplicates become `filtered` by stage `dedup`, with a
    message naming the representative (its relpath when known, and id)."""
    out = {k: np.array(v, dtype=object, copy=True) if k in ("status", "reason", "stage", "message") else v
           for k, v in batch.items()}
    out["duplicate_of"] = np.array([""] * len(batch["id"]), dtype=object)
    found = marks.find(batch["id"])
    for i in np.flatnonzero(found >= 0).tolist():
        k = found[i]
        kind = "exact" if marks.exact[k] else "near"
        rep, path = marks.representatives[k].decode(), marks.paths[k].decode()
        out["status"][i], out["reason"][i], out["stage"][i] = "filtered", f"duplicate_{kind}", "dedup"
        out["message"][i] = f"{kind} duplicate of {path} ({rep})" if path else f"{kind} duplicate of {rep}"
        out["duplicate_of"][i] = rep
    return out


def mark_duplicates(batch: dict[str, np.ndarray], dups: dict[str, tuple[str, str]]) -> dict[str, np.ndarray]:
    """`mark` with the duplicates as a dict (the representative's relpath unknown: the message names its id)."""
    return mark(batch, Marks.of_dict(dups))


def apply_duplicates(rows: list[dict], dups: dict[str, tuple[str, str]]) -> list[dict]:
    """New rows with `duplicate_of` ("" unless a duplicate); duplicates become `filtered` by stage `dedup`."""
    relpaths = {r["id"]: r.get("relpath", "") for r in rows}
    out = []
    for row in rows:
        if row["id"] not in dups:
            out.append({**row, "duplicate_of": ""})
            continue
        rep, kind = dups[row["id"]]
        out.append({**row, "duplicate_of": rep, "status": "filtered", "reason": f"duplicate_{kind}",
                    "stage": "dedup", "message": f"{kind} duplicate of {relpaths.get(rep, '')} ({rep})"})
    return out
