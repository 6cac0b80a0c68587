"""Readmission planning: which duplicates of a representative filtered after dedup are curated again."""
from __future__ import annotations

import pyarrow as pa

from latentforge.pipelines.readmit import READMITTED, apply_repoint, earlier_groups, readmission_round, readmit
from latentforge.pipelines.duplicates import apply_duplicates, find_duplicates
from latentforge.pipelines.stages.dedup import DedupConfig

LATER = {"filter_sharpness", "caption_select"}
CFG = DedupConfig(max_distance=4)


def row(rid: str, phash: str, sha: str | None = None, res: float = 1.0, modality: str = "image") -> dict:
    return {"id": rid, "relpath": f"{rid}.png", "status": "ok", "modality": modality, "stage": "", "reason": "",
            "message": "", "content_sha256": sha or f"sha-{rid}", "phash": phash, "score_resolution": res,
            "input_signature": f"sig-{rid}"}


def deduped(rows: list[dict]) -> list[dict]:
    return apply_duplicates(rows, find_duplicates(rows, CFG))


def fail(rows: list[dict], *ids: str, stage: str = "filter_sharpness", reason: str = "blurry") -> list[dict]:
    return [{**r, "status": "filtered", "stage": stage, "reason": reason} if r["id"] in ids else r for r in rows]


def by_id(table: pa.Table) -> dict[str, dict]:
    """readmit's table of rows, by id (keys a row lacked: None)."""
    return {r["id"]: r for r in table.to_pylist()}


H = "ffff0000ffff0000"  # a pHash, and near copies of it (one, two bits off)
H1, H2 = "ffff0000ffff0001", "ffff0000ffff0003"
FAR = "0000ffff0000ffff"


def test_the_best_near_duplicate_of_a_filtered_representative_is_readmitted_not_its_exact_copies() -> None:
    rows = deduped([row("up", H, res=4.0), row("up2", H, sha="sha-up", res=4.0), row("orig", H1, res=2.0),
                    row("small", H2, res=1.0), row("other", FAR)])
    assert {r["id"]: r["duplicate_of"] for r in rows} == {"up": "", "up2": "up", "orig": "up", "small": "up",
                                                           "other": ""}
    assert not readmission_round(rows, CFG, LATER).candidates  # nothing failed after dedup: nothing to do
    rows = fail(rows, "up")
    plan = readmission_round(rows, CFG, LATER)
    # the exact copy of the blurry upscale would fail the same way; the next best near copy goes, status cleared
    assert [c["id"] for c in plan.candidates] == ["orig"]
    assert plan.candidates[0]["status"] == "ok" and plan.candidates[0]["duplicate_of"] == ""
    assert plan.repoint == {"small": ("orig", "near")}
    after = by_id(apply_repoint(rows, plan))
    assert after["small"]["duplicate_of"] == "orig" and after["up2"]["duplicate_of"] == "up"
    assert "orig.png (orig), after up.png (up) left at filter_sharpness: blurry" in after["small"]["message"]


def test_duplicates_near_a_kept_row_join_it_and_far_apart_ones_each_get_a_candidate() -> None:
    # leader L claims a (1 bit) and b (4 bits); a and b are 5 bits apart; k is kept, 1 bit from b, claimed by
    # nobody (it is farther than 4 from L)... then L fails
    L, a, b = "0000000000000000", "0000000000000001", "000000000000001e"
    k = "000000000000003e"
    rows = deduped([row("L", L, res=9.0), row("a", a, res=2.0), row("b", b, res=3.0), row("k", k, res=1.0)])
    assert {r["id"]: r["duplicate_of"] for r in rows} == {"L": "", "a": "L", "b": "L", "k": ""}
    plan = readmission_round(fail(rows, "L"), CFG, LATER)
    assert plan.repoint == {"b": ("k", "near")}  # a representative stands for b already
    assert [c["id"] for c in plan.candidates] == ["a"]
    # without k, a and b are too far apart for one to stand for the other: both are curated again
    rows = fail(deduped([row("L", L, res=9.0), row("a", a, res=2.0), row("b", b, res=3.0)]), "L")
    plan = readmission_round(rows, CFG, LATER)
    assert [c["id"] for c in plan.candidates] == ["a", "b"] and plan.repoint == {}


def test_exact_copies_among_the_duplicates_collapse_and_other_modalities_stay_apart() -> None:
    rows = deduped([row("up", H, res=4.0), row("o1", H1, sha="sha-o", res=2.0), row("o2", H1, sha="sha-o", res=2.0),
                    row("v", H, res=5.0, modality="video"), row("v2", H1, res=1.0, modality="video"),
                    row("sound", "", res=0.0, modality="audio"), row("sound2", "", sha="sha-sound", modality="audio")])
    plan = readmission_round(fail(rows, "up", "v", "sound", stage="caption_select", reason="no_caption"), CFG, LATER)
    assert [c["id"] for c in plan.candidates] == ["o1", "v2"]  # the audio copy is exact: it would fail alike
    assert plan.repoint == {"o2": ("o1", "exact")}
    # a row filtered by a stage before dedup (or by dedup) is no failed representative
    assert not readmission_round(fail(rows, "up", stage="filter_basic"), CFG, LATER).candidates


def test_rounds_go_on_while_readmitted_rows_fail_and_reuse_the_groups_a_run_finished() -> None:
    rows = fail(deduped([row("a", H, res=4.0), row("b", H1, res=3.0), row("c", H2, res=2.0)]), "a")
    calls: list[list[str]] = []

    def curate(todo: list[dict]) -> list[dict]:  # b fails like a did, c passes
        calls.append([r["id"] for r in todo])
        return fail([{**r, "shard_name": f"g{r['shard']}"} for r in todo], "b")

    discarded: list[int] = []
    meta, count = readmit(rows, CFG, LATER, 7, 64, {}, curate, lambda g, _: discarded.append(g))
    out = by_id(meta)
    assert calls == [["b"], ["c"]] and count == 2 and not discarded
    assert out["c"]["status"] == "ok" and out["c"]["shard"] == 8 and out["b"]["shard"] == 7
    assert out["b"]["status"] == "filtered" and out["b"]["stage"] == "filter_sharpness"
    assert out["a"]["status"] == "filtered" and meta.num_rows == 3
    # a second run with both groups done curates nothing; a group whose input changed is discarded and redone
    done = {7: [out["b"]], 8: [out["c"]], 9: [out["c"]]}
    calls.clear()
    again, _ = readmit(rows, CFG, LATER, 7, 64, done, curate, lambda g, _: discarded.append(g))
    assert calls == [] and by_id(again) == out and discarded == [9]
    done = {7: [out["b"]], 8: [{**out["c"], "input_signature": "changed"}]}
    discarded.clear()
    redone, _ = readmit(rows, CFG, LATER, 7, 64, done, curate, lambda g, _: discarded.append(g))
    assert calls == [["c"]] and discarded == [8]
    assert {i: r["shard"] for i, r in by_id(redone).items()} == {"a": None, "b": 7, "c": 9}  # past both earlier ones
    # groups are reused by their inputs, not their numbers: the job's own groups grew past 7 and 8 (inputs
    # added), so its first readmission group is 12; the finished 7 and 8 still serve
    calls.clear()
    again, _ = readmit(rows, CFG, LATER, 12, 64, {7: [out["b"]], 8: [out["c"]]}, curate, lambda g, _: 1 / 0)
    assert calls == [] and by_id(again) == out
    # one round only: c stays a duplicate, now of b
    calls.clear()
    meta, _ = readmit(rows, DedupConfig(readmit_rounds=1), LATER, 7, 64, {}, curate, lambda g, _: None)
    assert calls == [["b"]] and {i: r["duplicate_of"] for i, r in by_id(meta).items()} == {"a": "", "b": "", "c": "b"}
    same, count = readmit(rows, DedupConfig(readmit_rounds=0), LATER, 7, 64, {}, curate, lambda g, _: None)
    assert count == 0 and same.to_pylist() == rows


def test_an_earlier_runs_readmission_groups_are_told_from_the_jobs_own() -> None:
    own, ours = [{"id": "a", "shard": 1}], [{"id": "b", "shard": 2, READMITTED: True}]
    done = {0: own, 1: own, 2: ours, 3: [{**ours[0], "shard": 3}], 5: own}
    assert sorted(earlier_groups(done)) == [2, 3] and sorted(done) == [0, 1, 5]



def test_duplicates_of_a_representative_whose_input_was_removed_are_readmitted_exact_copies_too() -> None:
    """An incremental rerun keeps a finished group whose duplicate points at a representative in another group;
    when the representative's file is removed, nothing stands for the duplicates: the best goes round again."""
    rows = deduped([row("rep", H, res=4.0), row("copy", H, sha="sha-rep", res=1.0), row("near", H1, res=2.0),
                    row("other", FAR)])
    assert {r["id"]: r["duplicate_of"] for r in rows} == {"rep": "", "copy": "rep", "near": "rep", "other": ""}
    gone = [r for r in rows if r["id"] != "rep"]  # rep's input removed: its rows left the job
    plan = readmission_round(gone, CFG, LATER)
    assert [c["id"] for c in plan.candidates] == ["near"] and plan.repoint == {"copy": ("near", "near")}
    assert plan.messages["copy"] == "near duplicate of near.png (near), after rep left the inputs"
