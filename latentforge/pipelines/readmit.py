"""Readmission: when a later stage filters a duplicate group's representative, curate its best duplicate instead.

Dedup runs at the scan's barrier, before the scores that need the stage actors (sharpness, text area, aesthetic,
NSFW, audio quality, captions), and keeps the copy with the highest resolution. A blurry upscale, or the
watermarked copy of a stock photo, is often that copy: a later filter then drops it, and with it every copy
of the picture, although a sharp or clean one was there. Scoring every duplicate before choosing would spend
the stages' compute on all copies (what dedup exists to save), and moving the filters before the barrier would
make the GPU stages wait for all CPU scoring. So the job runs as before, and afterwards, for each representative
that a later stage filtered or rejected, its near duplicates (not its exact copies: the same bytes fail the same
way) run through the stages once more (`readmission_round`, then `readmit` in the job), the best first, in shard
groups numbered after the job's own. Duplicates of a representative that failed again go round again, up to
`dedup.readmit_rounds` times.
"""
from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from latentforge.datasets.columns import codes, first_of_each
from latentforge.pipelines import meta as mt
from latentforge.pipelines.duplicates import SETTLED, _exact_groups, _near_groups, preference_order
from latentforge.pipelines.near_index import HashSet, agreeing_bands, width
from latentforge.pipelines.resume import Done
from latentforge.pipelines.stages.dedup import DedupConfig

# What readmission_round reads of each row.
READ = ("id", "relpath", "status", "stage", "reason", "modality", "content_sha256", "phash", "score_resolution",
        SETTLED, "duplicate_of")
CLEARED = {"status": "ok", "reason": "", "stage": "", "message": "", "duplicate_of": ""}
READMITTED = "readmitted"  # a column set on the rows of readmission's shard groups (so their markers say so)


@dataclass
class Readmission:
    """One round: the rows to curate again (status cleared), and the duplicates that now point elsewhere
    (id -> (representative id, "exact" | "near")), each with the message its row gets."""

    candidates: list[dict] = field(default_factory=list)
    repoint: dict[str, tuple[str, str]] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)


def readmission_round(rows: pa.Table | list[dict], cfg: DedupConfig, later_stages: set[str]) -> Readmission:
    """What to readmit, given the job's rows (metadata, a table or dicts: id, status, stage, reason, duplicate_of,
    modality, content_sha256, phash, score_resolution, relpath).

    A failed representative is a row some duplicate points at that a stage in `later_stages` filtered or rejected.
    Its duplicates, less its exact copies, are pooled per modality with those of the other failed
    representatives, as are all duplicates of a representative no row is of (its input removed since). One
    within `max_distance` of a kept row becomes that row's duplicate; the rest collapse by bytes, then form
    greedy near groups as in dedup (best first): each group's leader is a candidate and its other members point
    at it, so if it passes they stay duplicates of a kept row, and if it fails they are the next round's.

    Found in columns; only the waiting duplicates, their representatives and the kept rows they join become
    dicts (a job's rows are millions, the ones readmission moves a few).
    """
    table = mt.as_table(rows)
    plan = Readmission()
    if not table.num_rows:
        return plan
    ids, status, stage = (mt.strings(table, c) for c in ("id", "status", "stage"))
    dup_of = mt.strings(table, "duplicate_of")
    standby = np.flatnonzero(_np(pc.and_(pc.and_(pc.equal(status, "filtered"), pc.equal(stage, "dedup")),
                                         pc.not_equal(dup_of, ""))))  # the rows dedup took out as duplicates
    if not len(standby):
        return plan
    rep = pc.index_in(dup_of.take(standby), value_set=ids.combine_chunks()).fill_null(-1).to_numpy()
    present = rep >= 0
    reps = pa.array(np.where(present, rep, 0))
    later = pa.array(sorted(later_stages), pa.string())
    failed = _np(pc.and_(pc.not_equal(status.take(reps), "ok"), pc.is_in(stage.take(reps), value_set=later)))
    sha = mt.strings(table, "content_sha256")
    other_bytes = _np(pc.not_equal(sha.take(pa.array(standby)), sha.take(reps)))
    # A representative that left the inputs (its file removed since an earlier run; the duplicate's group kept):
    # all its duplicates wait, exact copies too, since nothing stands for them now.
    waits = ~present | (failed & other_bytes)
    waiting_at, rep_at = standby[waits], rep[waits & present]
    if not len(waiting_at):
        return plan
    by_id = _dicts(table, np.union1d(waiting_at, rep_at))
    waiting = [by_id[i] for i in ids.take(pa.array(waiting_at)).to_pylist()]
    pools: dict[str, list[dict]] = defaultdict(list)
    for r in waiting:
        pools[str(r.get("modality") or "")].append(r)
    modality = mt.strings(table, "modality")
    hashed_ok = pc.and_(pc.equal(status, "ok"), pc.not_equal(mt.strings(table, "phash"), ""))
    for kind, pool in sorted(pools.items()):
        kept_at = np.flatnonzero(_np(pc.and_(hashed_ok, pc.equal(modality, kind))))
        pool = _to_kept(pool, table, kept_at, cfg.max_distance, plan, by_id)
        exact = _exact_groups(pool)  # one row per content hash (the preferred); the others its exact duplicates
        plan.repoint.update(exact)
        leaders = [r for r in pool if str(r["id"]) not in exact]
        hashed = [r for r in leaders if r.get("phash")]
        near = _near_groups(hashed, cfg.max_distance) if hashed else {}
        for dup, (rep_id, _) in near.items():
            plan.repoint[dup] = (rep_id, "near")
        plan.candidates += [r for r in leaders if str(r["id"]) not in near]
    _follow(plan, by_id)  # exact copies of a near follower: at the follower's leader
    for dup, (rep_id, kind) in plan.repoint.items():
        plan.messages[dup] = (f"{kind} duplicate of {by_id[rep_id].get('relpath') or ''} ({rep_id}), "
                              f"after {_left(dup, by_id)}")
    plan.candidates = sorted(({**r, **CLEARED} for r in plan.candidates), key=lambda r: str(r["id"]))
    return plan


def _np(mask: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)


def _dicts(table: pa.Table, positions: np.ndarray) -> dict[str, dict]:
    """The rows at `positions` as dicts, by id."""
    return {str(r["id"]): r for r in table.take(pa.array(np.asarray(positions, np.int64))).to_pylist()}


def _left(dup: str, by_id: dict[str, dict]) -> str:
    """How the representative `dup` pointed at went: filtered at a stage, or gone from the inputs."""
    was = by_id.get(by_id[dup]["duplicate_of"])
    if was is None:
        return f"{by_id[dup]['duplicate_of']} left the inputs"
    return f"{was.get('relpath', '')} ({was['id']}) left at {was.get('stage')}: {was.get('reason')}"


def _to_kept(pool: list[dict], table: pa.Table, kept_at: np.ndarray, max_distance: int, plan: Readmission,
             by_id: dict[str, dict]) -> list[dict]:
    """`pool` less the rows within max_distance of a kept row (the rows of `table` at `kept_at`): those become
    that row's (the best one's) duplicates, since a representative already stands for them; the kept rows they
    join are added to `by_id`."""
    hashed = [r for r in pool if r.get("phash")]
    if not len(kept_at) or not hashed:
        return pool
    kept = table.select([c for c in ("id", "phash", "score_resolution", SETTLED) if c in table.column_names])
    kept = kept.take(pa.array(kept_at))
    order = preference_order(kept.select([c for c in ("id", "score_resolution", SETTLED) if c in kept.column_names]))
    phashes = mt.strings(kept, "phash").take(pa.array(order))
    targets = np.unique(first_of_each(codes(phashes)))  # each distinct hash's best kept row, best first
    best_hashes = phashes.take(pa.array(targets))
    asked = list(dict.fromkeys(r["phash"] for r in hashed))  # distinct hashes of the pool
    bits = max(width(best_hashes), width(asked))
    agree = agreeing_bands(len(targets) + len(asked), bits, max_distance)  # both sides cut alike
    found, near = HashSet(asked, max_distance, bits, agree).pairs_with(HashSet(best_hashes, max_distance, bits, agree))
    best: dict[str, int] = {}
    for a, k in zip(found.tolist(), near.tolist()):  # sorted by kept hash, i.e. by its best row: the first is best
        best.setdefault(asked[a], int(kept_at[order[targets[k]]]))
    by_id.update(_dicts(table, np.unique(np.array(list(best.values()), np.int64))))
    kept_ids = mt.strings(table, "id")
    out = []
    for row in pool:
        k = best.get(row.get("phash") or "")
        if k is not None:
            plan.repoint[str(row["id"])] = (kept_ids[k].as_py(), "near")
        else:
            out.append(row)
    return out


def _follow(plan: Readmission, by_id: dict[str, dict]) -> None:
    """Point every moved row at a final representative (a candidate or a kept row), never at another mover,
    labelled by whether its bytes equal that representative's."""
    for dup in list(plan.repoint):
        rep = plan.repoint[dup][0]
        while rep in plan.repoint:
            rep = plan.repoint[rep][0]
        same = by_id[dup].get("content_sha256") == by_id[rep].get("content_sha256")
        plan.repoint[dup] = (rep, "exact" if same else "near")


def apply_repoint(rows: pa.Table | list[dict], plan: Readmission) -> pa.Table:
    """`rows` with the moved duplicates pointing at their new representatives (moved rows last)."""
    table = mt.as_table(rows)
    if not plan.repoint:
        return table
    moved = [{**r, "duplicate_of": plan.repoint[i][0], "reason": f"duplicate_{plan.repoint[i][1]}",
              "message": plan.messages[i]} for i, r in _dicts(table, _positions(table, plan.repoint)).items()]
    return replace_rows(table, mt.from_rows(moved))


def _positions(table: pa.Table, ids) -> np.ndarray:
    return np.flatnonzero(_np(pc.is_in(mt.strings(table, "id"), value_set=pa.array(list(ids), pa.string()))))


def replace_rows(table: pa.Table, new: pa.Table) -> pa.Table:
    """`table` with each of its rows that `new` holds a row of the same id for replaced by that row (placed last);
    rows of `new` with other ids are left out."""
    new = new.filter(pc.is_in(mt.strings(new, "id"), value_set=mt.strings(table, "id").combine_chunks()))
    return mt.concat([mt.without(table, mt.strings(new, "id").to_pylist()), new], combine=False)


def readmit(meta: pa.Table | list[dict], cfg: DedupConfig, later_stages: set[str], first_group: int,
            per_group: int, done: dict[int, list[dict]], curate: Callable[[list[dict]], pa.Table | list[dict]],
            discard: Callable[[int, list[dict]], None]) -> tuple[pa.Table, int]:
    """Readmission rounds over the job's metadata rows `meta` (meta.py); returns them as a table with each
    readmitted row (kept or filtered again) in place of its dedup row and the moved duplicates repointed, and
    how many rows were curated again.

    Candidates go to shard groups of `per_group` rows each (in id order), which `curate` runs through the later
    stages and writes, returning their metadata rows. `done`: such groups an earlier run finished (resume); a
    planned group that holds the same inputs with the same signatures as one of them is that group, reused
    under its number; the others are numbered from `first_group` on (the job's own groups are below it),
    past every number in `done`, and the groups of `done` this job does not reuse are `discard`ed at the end.

    The rounds read a narrow view of `meta` (the columns readmission_round reads) and keep the rows they change
    as dicts, put in place at the end by slicing around the rows they replace (meta.without): a job's rows are
    millions, the rows readmission changes a few, and the table is not copied for them.
    """
    by_inputs: dict[tuple, int] = {}
    for g, rows in sorted(done.items()):
        by_inputs.setdefault(tuple(_inputs(rows)), g)  # of two groups with the same inputs, the first
    meta = mt.as_table(meta)
    view = meta.select([c for c in READ if c in meta.column_names])
    changed: dict[str, dict] = {}  # id -> the whole row as readmission left it

    def whole(ids: list[str]) -> list[dict]:
        """The rows of these ids as they are now (changed ones as changed), in the order given."""
        found = _dicts(meta, _positions(meta, [i for i in ids if i not in changed]))
        return [changed[i] if i in changed else found[i] for i in ids]

    def change(rows: list[dict]) -> None:
        nonlocal view
        changed.update({str(r["id"]): r for r in rows})
        new = mt.from_rows(rows)
        view = replace_rows(view, new.select([c for c in view.column_names if c in new.column_names]))

    taken, used, count = set(done), set(), 0
    numbers = (g for g in itertools.count(first_group) if g not in taken)
    for _ in range(cfg.readmit_rounds if cfg.enabled else 0):
        plan = readmission_round(view, cfg, later_stages)
        if plan.repoint:
            change([{**r, "duplicate_of": plan.repoint[i][0], "reason": f"duplicate_{plan.repoint[i][1]}",
                     "message": plan.messages[i]} for i, r in zip(plan.repoint, whole(list(plan.repoint)))])
        if not plan.candidates:
            break
        candidates = [{**r, **CLEARED} for r in whole([str(c["id"]) for c in plan.candidates])]
        results: list[dict] = []
        todo: list[dict] = []
        for start in range(0, len(candidates), per_group):
            part = candidates[start:start + per_group]
            group = by_inputs.get(tuple(_inputs(part)))
            if group is not None and group not in used:
                results += done[group]
                used.add(group)
            else:
                number = next(numbers)
                todo += [{**r, "shard": number, READMITTED: True} for r in part]
        again = mt.concat([mt.from_rows(results)] + ([mt.as_table(curate(todo))] if todo else []))
        count += len(plan.candidates)
        change(again.filter(pc.is_in(mt.strings(again, "id"), value_set=pa.array(
            [str(c["id"]) for c in candidates], pa.string()))).to_pylist())
    for g in sorted(set(done) - used):
        discard(g, done[g])
    return (replace_rows(meta, mt.from_rows(changed.values())) if changed else meta), count


def earlier_groups(done: Done | dict[int, list[dict]]) -> dict[int, list[dict]]:
    """Take an earlier run's readmission groups (their rows say READMITTED) out of `done` (done_groups), for
    `readmit` to reuse or discard, as dicts (a few groups); what stays in `done` are the job's own groups."""
    if not isinstance(done, Done):
        return {g: done.pop(g) for g in sorted(done) if any(r.get(READMITTED) for r in done[g])}
    if READMITTED not in done.table.column_names:
        return {}
    at, group = done.positions()
    flag = pc.fill_null(done.table[READMITTED].cast(pa.bool_()).take(pa.array(at)), False)
    return {g: done.pop(g).to_pylist() for g in sorted(set(group[_np(flag)].tolist()))}


def _inputs(rows: list[dict]) -> list[tuple[str, str]]:
    """What a readmission group was curated from: its rows' ids with their inputs' signatures."""
    return sorted((str(r["id"]), str(r.get("input_signature"))) for r in rows)
