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

from latentforge.pipelines.near_index import HashSet, agreeing_bands, width
from latentforge.pipelines.duplicates import _exact_groups, _near_groups, _preference
from latentforge.pipelines.stages.dedup import DedupConfig

CLEARED = {"status": "ok", "reason": "", "stage": "", "message": "", "duplicate_of": ""}
READMITTED = "readmitted"  # a column set on the rows of readmission's shard groups (so their markers say so)


@dataclass
class Readmission:
    """One round: the rows to curate again (status cleared), and the duplicates that now point elsewhere
    (id -> (representative id, "exact" | "near")), each with the message its row gets."""

    candidates: list[dict] = field(default_factory=list)
    repoint: dict[str, tuple[str, str]] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)


def standby(row: dict) -> bool:
    """A row dedup took out of the job as a duplicate (the only rows readmission may bring back)."""
    return row.get("status") == "filtered" and row.get("stage") == "dedup" and bool(row.get("duplicate_of"))


def readmission_round(rows: list[dict], cfg: DedupConfig, later_stages: set[str]) -> Readmission:
    """What to readmit, given the job's rows (metadata: id, status, stage, reason, duplicate_of, modality,
    content_sha256, phash, score_resolution, relpath).

    A failed representative is a row some duplicate points at that a stage in `later_stages` filtered or rejected.
    Its duplicates, less its exact copies, are pooled per modality with those of the other failed
    representatives, as are all duplicates of a representative no row is of (its input removed since). One
    within `max_distance` of a kept row becomes that row's duplicate; the rest collapse by bytes, then form
    greedy near groups as in dedup (best first): each group's leader is a candidate and its other members point
    at it, so if it passes they stay duplicates of a kept row, and if it fails they are the next round's.
    """
    by_id = {str(r["id"]): r for r in rows}
    failed = {i for i, r in by_id.items() if r.get("status") != "ok" and r.get("stage") in later_stages}
    # A representative that left the inputs (its file removed since an earlier run; the duplicate's group kept):
    # all its duplicates wait, exact copies too, since nothing stands for them now.
    waiting = [r for r in rows if standby(r) and (r["duplicate_of"] not in by_id or (
        r["duplicate_of"] in failed and r.get("content_sha256") != by_id[r["duplicate_of"]].get("content_sha256")))]
    plan = Readmission()
    if not waiting:
        return plan
    pools: dict[str, list[dict]] = defaultdict(list)
    for r in waiting:
        pools[str(r.get("modality", ""))].append(r)
    for modality, pool in sorted(pools.items()):
        kept = [r for r in rows if r.get("status") == "ok" and r.get("modality") == modality and r.get("phash")]
        pool = _to_kept(pool, kept, cfg.max_distance, plan)
        exact = _exact_groups(pool)  # one row per content hash (the preferred); the others its exact duplicates
        plan.repoint.update(exact)
        leaders = [r for r in pool if str(r["id"]) not in exact]
        hashed = [r for r in leaders if r.get("phash")]
        near = _near_groups(hashed, cfg.max_distance) if hashed else {}
        for dup, (rep, _) in near.items():
            plan.repoint[dup] = (rep, "near")
        plan.candidates += [r for r in leaders if str(r["id"]) not in near]
    _follow(plan, by_id)  # exact copies of a near follower: at the follower's leader
    for dup, (rep, kind) in plan.repoint.items():
        plan.messages[dup] = f"{kind} duplicate of {by_id[rep].get('relpath', '')} ({rep}), after {_left(dup, by_id)}"
    plan.candidates = sorted(({**r, **CLEARED} for r in plan.candidates), key=lambda r: str(r["id"]))
    return plan


def _left(dup: str, by_id: dict[str, dict]) -> str:
    """How the representative `dup` pointed at went: filtered at a stage, or gone from the inputs."""
    was = by_id.get(by_id[dup]["duplicate_of"])
    if was is None:
        return f"{by_id[dup]['duplicate_of']} left the inputs"
    return f"{was.get('relpath', '')} ({was['id']}) left at {was.get('stage')}: {was.get('reason')}"


def _to_kept(pool: list[dict], kept: list[dict], max_distance: int, plan: Readmission) -> list[dict]:
    """`pool` less the rows within max_distance of a kept row: those become that row's (the best one's)
    duplicates, since a representative already stands for them."""
    hashed = [r for r in pool if r.get("phash")]
    if not kept or not hashed:
        return pool
    kept = sorted(kept, key=_preference)
    best_kept: dict[str, int] = {}  # each distinct hash's best kept row: the one a match points at
    for k, row in enumerate(kept):
        best_kept.setdefault(row["phash"], k)
    asked = list(dict.fromkeys(r["phash"] for r in hashed))  # distinct hashes of the pool
    bits = width(list(best_kept) + asked)
    agree = agreeing_bands(len(best_kept) + len(asked), bits, max_distance)  # both sides cut alike
    targets = list(best_kept.values())
    found, near = HashSet(asked, max_distance, bits, agree).pairs_with(
        HashSet(list(best_kept), max_distance, bits, agree))
    best: dict[str, int] = {}
    for a, k in zip(found.tolist(), near.tolist()):  # sorted by kept hash, i.e. by its best row: the first is best
        best.setdefault(asked[a], targets[k])
    out = []
    for row in pool:
        k = best.get(row.get("phash") or "")
        if k is not None:
            plan.repoint[str(row["id"])] = (str(kept[k]["id"]), "near")
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


def apply_repoint(rows: list[dict], plan: Readmission) -> list[dict]:
    """`rows` with the moved duplicates pointing at their new representatives."""
    out = []
    for r in rows:
        move = plan.repoint.get(str(r["id"]))
        out.append(r if move is None else {**r, "duplicate_of": move[0], "reason": f"duplicate_{move[1]}",
                                           "message": plan.messages[str(r["id"])]})
    return out


def readmit(meta: list[dict], cfg: DedupConfig, later_stages: set[str], first_group: int, per_group: int,
            done: dict[int, list[dict]], curate: Callable[[list[dict]], list[dict]],
            discard: Callable[[int, list[dict]], None]) -> tuple[list[dict], int]:
    """Readmission rounds over the job's metadata rows `meta`; returns them with each readmitted row (kept or
    filtered again) in place of its dedup row and the moved duplicates repointed, and how many rows were
    curated again.

    Candidates go to shard groups of `per_group` rows each (in id order), which `curate` runs through the later
    stages and writes, returning their metadata rows. `done`: such groups an earlier run finished (resume); a
    planned group that holds the same inputs with the same signatures as one of them is that group, reused
    under its number; the others are numbered from `first_group` on (the job's own groups are below it),
    past every number in `done`, and the groups of `done` this job does not reuse are `discard`ed at the end.
    """
    by_inputs: dict[tuple, int] = {}
    for g, rows in sorted(done.items()):
        by_inputs.setdefault(tuple(_inputs(rows)), g)  # of two groups with the same inputs, the first
    taken, used, count = set(done), set(), 0
    numbers = (g for g in itertools.count(first_group) if g not in taken)
    for _ in range(cfg.readmit_rounds if cfg.enabled else 0):
        plan = readmission_round(meta, cfg, later_stages)
        meta = apply_repoint(meta, plan)
        if not plan.candidates:
            break
        results, todo = [], []
        for start in range(0, len(plan.candidates), per_group):
            part = plan.candidates[start:start + per_group]
            group = by_inputs.get(tuple(_inputs(part)))
            if group is not None and group not in used:
                results += done[group]
                used.add(group)
            else:
                number = next(numbers)
                todo += [{**r, "shard": number, READMITTED: True} for r in part]
        results += curate(todo) if todo else []
        count += len(plan.candidates)
        again = {str(r["id"]): r for r in results}
        meta = [again.get(str(r["id"]), r) for r in meta]
    for g in sorted(set(done) - used):
        discard(g, done[g])
    return meta, count


def earlier_groups(done: dict[int, list[dict]]) -> dict[int, list[dict]]:
    """Take an earlier run's readmission groups (their rows say READMITTED) out of `done` (done_groups), for
    `readmit` to reuse or discard; what stays in `done` are the job's own groups."""
    return {g: done.pop(g) for g in sorted(done) if any(r.get(READMITTED) for r in done[g])}


def _inputs(rows: list[dict]) -> list[tuple[str, str]]:
    """What a readmission group was curated from: its rows' ids with their inputs' signatures."""
    return sorted((str(r["id"]), str(r.get("input_signature"))) for r in rows)
