"""Shard groups on a rerun: discovery's assignment while it agrees with the finished groups (a stopped job), the
finished groups' own inputs once files were added or removed (so their tars stay), and stray tars removed."""
from __future__ import annotations

from latentforge.pipelines.resume import regroup, stale_groups, sweep


def discovered(*names: str, per_group: int = 2) -> list[dict]:
    """Rows as discover gives them: sorted by path, groups by index."""
    return [{"id": n, "relpath": f"{n}.png", "input_signature": f"sig-{n}", "shard": i // per_group}
            for i, n in enumerate(sorted(names))]


def marker(*names: str, shard: int = 0) -> list[dict]:
    return [{"id": n, "source_id": n, "input_signature": f"sig-{n}", "shard": shard} for n in names]


def groups(rows: list[dict]) -> dict[str, int]:
    return {r["id"]: r["shard"] for r in rows}


def assign(rows: list[dict], done, taken: set[int]) -> tuple[list[dict], bool, list[int]]:
    """regroup's rows (a table) as dicts, whether the groups were kept, the stale groups."""
    table, kept, stale = regroup(rows, done, taken, 2)
    return table.to_pylist(), kept, stale


def test_a_stopped_job_keeps_discoverys_groups() -> None:
    rows = discovered("b", "c", "d", "e", "f")
    done = {0: marker("b", "c"), 2: marker("f")}  # group 1 was not finished
    rows, kept, stale = assign(rows, done, set())
    assert (kept, stale) == (False, [])
    assert groups(rows) == {"b": 0, "c": 0, "d": 1, "e": 1, "f": 2} and stale_groups(done, rows) == []


def test_a_file_that_sorts_first_goes_to_a_new_group_and_the_finished_ones_keep_theirs() -> None:
    rows = discovered("a", "b", "c", "d", "e", "f")  # a added: discovery would shift every group by one
    done = {0: marker("b", "c"), 1: marker("d", "e"), 2: marker("f")}
    assert stale_groups(done, rows) == [0, 1, 2]
    rows, kept, stale = assign(rows, done, {3})
    assert (kept, stale) == (True, [])  # 3: a readmission group of the earlier run; nothing redone
    assert groups(rows) == {"b": 0, "c": 0, "d": 1, "e": 1, "f": 2, "a": 4}
    assert stale_groups(done, rows) == []  # nothing finished is redone
    assert [r["id"] for r in rows] == ["b", "c", "d", "e", "f", "a"]  # by group: each group's rows together


def test_a_removed_or_changed_input_redoes_only_its_group_under_its_number() -> None:
    rows = discovered("c", "d", "e", "f", "g")  # b removed from group 0
    rows[2]["input_signature"] = "sig-e-rewritten"  # e changed in place (group 1)
    done = {0: marker("b", "c"), 1: marker("d", "e"), 2: marker("f", "g")}
    rows, kept, stale = assign(rows, done, set())
    assert (kept, stale) == (True, [0, 1])
    assert groups(rows) == {"c": 0, "d": 1, "e": 1, "f": 2, "g": 2}
    assert stale_groups(done, rows) == [0, 1]
    # every input of a group removed: no input is assigned to it, so it is discarded and not redone
    rows = discovered("d", "e")
    rows, kept, stale = assign(rows, {0: marker("b", "c"), 1: marker("d", "e")}, set())
    assert (kept, stale) == (True, [0])
    assert groups(rows) == {"d": 1, "e": 1} and stale_groups({0: marker("b", "c")}, rows) == [0]


def test_files_appended_where_a_readmission_group_stands_keep_the_groups_too() -> None:
    """Discovery would give the new files group 2, the number an earlier run's readmission group has: the
    finished groups keep their inputs and the new files go after the readmission group instead."""
    rows = discovered("a", "b", "c", "d", "e")
    done = {0: marker("a", "b"), 1: marker("c", "d")}
    assert stale_groups(done, rows) == []
    rows, kept, stale = assign(rows, done, {2})
    assert (kept, stale) == (True, []) and groups(rows)["e"] == 3
    rows, kept, stale = assign(discovered("a", "b", "c", "d", "e"), done, {3})
    assert (kept, stale) == (False, []) and rows == discovered("a", "b", "c", "d", "e")  # no clash: as discovered


def test_an_input_two_markers_claim_stays_with_the_first_and_the_other_group_is_redone() -> None:
    rows = discovered("a", "b", "c")
    done = {0: marker("a", "b"), 1: marker("b", "c")}
    rows, kept, stale = assign(rows, done, set())
    assert (kept, stale) == (True, [1])
    assert groups(rows) == {"a": 0, "b": 0, "c": 1} and stale_groups(done, rows) == [1]


def test_sweep_removes_only_shard_tars_no_sample_names(tmp_path) -> None:
    for name in ("shard-000000-00.tar", "shard-000001-00.tar", "shard-000001-01.tar", "notes.tar",
                 "shard-000002-00.tar.123-4.partial", "_done/group-000001.json"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert sweep(tmp_path, {"shard-000000-00.tar"}) == ["shard-000001-00.tar", "shard-000001-01.tar"]
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["_done/group-000001.json", "notes.tar", "shard-000000-00.tar", "shard-000002-00.tar.123-4.partial"]


def test_finished_groups_are_slices_of_one_table_and_leave_it_when_taken_out(monkeypatch) -> None:
    from latentforge.pipelines import meta
    from latentforge.pipelines.resume import Done

    done = Done.of({2: marker("c", shard=2), 0: marker("a", "b"), 5: marker("d", "e", shard=5)})
    assert list(done) == [0, 2, 5] and len(done) == 3 and 2 in done and 1 not in done
    assert done[5].column("id").to_pylist() == ["d", "e"] and done.rows() is done.table  # all there: no copy
    taken = done.pop(2)
    assert taken.column("id").to_pylist() == ["c"] and list(done) == [0, 5]
    at, group = done.positions()
    assert [done.table["id"][i].as_py() for i in at] == ["a", "b", "d", "e"] and group.tolist() == [0, 0, 5, 5]
    assert done.rows().column("id").to_pylist() == ["a", "b", "d", "e"]  # a copy: 2 runs of 4 rows are too many
    monkeypatch.setattr(meta, "SLICE_ROWS", 1)
    assert done.rows().column("id").to_pylist() == ["a", "b", "d", "e"]  # slices [0, 2) and [3, 5) of the table
    assert done.rows().column("id").num_chunks == 2
    assert Done.of(done) is done and Done.of({}).rows().num_rows == 0 and Done().positions()[0].size == 0


def test_stale_groups_at_the_edges_agree_with_the_definition() -> None:
    from latentforge.pipelines.resume import Done

    done = {0: marker("a", "b"), 1: [], 2: marker("c", shard=2)}
    assert stale_groups(done, []) == [0, 2]  # no inputs at all: every group that holds one
    assert stale_groups({1: []}, discovered("a", "b", "c")) == [1]  # an empty group where inputs now go
    assert stale_groups({7: []}, discovered("a")) == []
    assert 0 in Done.of(done) and 3 not in Done.of(done)


def test_markers_on_an_object_store_are_read_by_threads_in_order_and_checked_alike(s3_bucket, tmp_path) -> None:
    """done_groups on s3:// (moto on loopback): the reader threads return what one reader does, in group order,
    for markers of this config whose tars are intact; a marker of another config, one whose tar is gone and one
    that is not JSON are left out, by size and by sha256 alike."""
    import hashlib

    from latentforge.datasets import storage
    from latentforge.pipelines.resume import done_groups, write_marker

    local = tmp_path / "shards"
    local.mkdir()
    for g in range(12):
        tar = f"shard-{g:06d}-00.tar"
        (local / tar).write_bytes(bytes([g]) * (100 + g))
        sha = hashlib.sha256((local / tar).read_bytes()).hexdigest()
        rows = [{"id": f"g{g}r{i}", "shard": g, "shard_name": tar, "shard_sha256": sha} for i in range(g % 3 + 1)]
        write_marker(local, g, rows, "other" if g == 4 else "cfg")
    (local / "shard-000007-00.tar").unlink()  # group 7's tar gone
    (local / "_done" / "group-000009.json").write_text("{not json")
    remote = f"s3://{s3_bucket}/ds/shards"
    storage.upload(local, remote)
    for check in ("size", "sha256"):
        one = done_groups(remote, "cfg", check, readers=1)
        threads = done_groups(remote, "cfg", check, readers=2)  # two windows: 8 markers, then 4
        assert list(threads) == list(one) == [0, 1, 2, 3, 5, 6, 8, 10, 11]
        assert threads.table.equals(one.table) and threads.bounds == one.bounds
        assert threads[5]["id"].to_pylist() == ["g5r0", "g5r1", "g5r2"]
    assert list(done_groups(remote, "cfg")) == list(one)  # the default on a URI: READERS threads
