"""A curation job stopped part-way and started again redoes only the missing shard groups and writes the
same dataset (manifest, rejects, card, shard bytes) as an uninterrupted run."""
from __future__ import annotations

import json
import shutil

import pytest

from latentforge.datasets import manifest as mf
from latentforge.datasets.demo_corpus import DemoCorpusSpec, generate_demo_corpus
from latentforge.pipelines.config import CurationConfig
from latentforge.pipelines.curate import run_curation
from latentforge.pipelines.resume import DONE_DIR, marker_path

pytestmark = pytest.mark.integration


def snapshot(root):
    ds = mf.Dataset(root)
    card = ds.card
    return ds.manifest().to_pylist(), ds.rejects().to_pylist(), card, {
        s["name"]: (root / mf.SHARDS / s["name"]).read_bytes() for s in card["shards"]}


def test_a_resumed_job_matches_an_uninterrupted_one(tmp_path, ray_local):
    corpus = tmp_path / "corpus"
    generate_demo_corpus(corpus, DemoCorpusSpec(num_images=8, num_videos=3, num_audio=3, seed=11))
    cfg = CurationConfig(input_dir=corpus, samples_per_shard=6)
    straight = tmp_path / "straight"
    run_curation(cfg, straight)
    expected = snapshot(straight)

    # A copy of the finished job, then undo what a crash part-way would not have finished: the last two
    # groups lose their tars and markers, and a third loses only its marker (tars written, marker not yet).
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for f in (mf.MANIFEST, mf.REJECTS, mf.CARD):
        (resumed / f).unlink()
    groups = sorted(int(p.stem.split("-")[1]) for p in (resumed / mf.SHARDS / DONE_DIR).glob("group-*.json"))
    assert len(groups) >= 4
    for g in groups[-2:]:
        for tar in (resumed / mf.SHARDS).glob(f"shard-{g:06d}-*.tar"):
            tar.unlink()
        marker_path(resumed / mf.SHARDS, g).unlink()
    marker_path(resumed / mf.SHARDS, groups[1]).unlink()
    untouched = sorted((resumed / mf.SHARDS).glob(f"shard-{groups[0]:06d}-*.tar"))
    before = {p: p.stat().st_mtime_ns for p in untouched}

    run_curation(cfg, resumed)
    assert {p: p.stat().st_mtime_ns for p in untouched} == before  # done groups were not redone
    got = snapshot(resumed)
    assert got[0] == expected[0] and got[1] == expected[1]
    assert json.dumps(got[2], sort_keys=True) == json.dumps(expected[2], sort_keys=True)
    assert got[3] == expected[3]


def test_a_changed_config_or_damaged_tar_is_not_trusted(tmp_path, ray_local):
    from latentforge.pipelines.resume import done_groups

    corpus = tmp_path / "corpus"
    generate_demo_corpus(corpus, DemoCorpusSpec(num_images=4, num_videos=1, num_audio=1, seed=12, include_broken=False))
    cfg = CurationConfig(input_dir=corpus, samples_per_shard=4)
    run_curation(cfg, tmp_path / "ds")
    shard_dir = tmp_path / "ds" / mf.SHARDS
    from latentforge.pipelines.curate import config_hash

    done = done_groups(shard_dir, config_hash(cfg))
    assert done and done_groups(shard_dir, "another-config") == {}
    assert len(done) >= 2 and done_groups(shard_dir, config_hash(cfg), "sha256") == done
    first, second = sorted(shard_dir.glob("*.tar"))[:2]
    assert first.name.split("-")[1] != second.name.split("-")[1]  # of two groups
    first.write_bytes(first.read_bytes()[:-100])  # cut short: its size tells
    assert len(done_groups(shard_dir, config_hash(cfg))) == len(done) - 1
    data = bytearray(second.read_bytes())  # one byte changed, same size: only reading it back tells
    data[600] ^= 0xFF
    second.write_bytes(bytes(data))
    assert len(done_groups(shard_dir, config_hash(cfg))) == len(done) - 1
    assert len(done_groups(shard_dir, config_hash(cfg), "sha256")) == len(done) - 2
    for marker in (shard_dir / DONE_DIR).glob("group-*.json"):  # markers of jobs before sizes were recorded
        body = json.loads(marker.read_text())
        body.pop("sizes")
        marker.write_text(json.dumps(body))
    assert len(done_groups(shard_dir, config_hash(cfg))) == len(done) - 2  # are read back


def accounted(root) -> list[str]:
    """Every input the dataset accounts for (kept, filtered or rejected), once per row (clips repeat theirs)."""
    ds = mf.Dataset(root)
    return sorted(r["source_id"] for r in ds.manifest().to_pylist() + ds.rejects().to_pylist())


def test_stale_groups_compares_the_inputs_a_marker_came_from():
    from latentforge.pipelines.resume import stale_groups

    rows = [{"id": i, "shard": n // 2} for n, i in enumerate(["a", "b", "c", "d", "e"])]  # b added: {a,b} {c,d} {e}
    done = {0: [{"id": "a", "source_id": "a"}, {"id": "c", "source_id": "c"}],  # written as {a, c}
            1: [{"id": "c0", "source_id": "c"}, {"id": "c1", "source_id": "c"}, {"id": "d", "source_id": "d"}],
            2: [{"id": "e", "source_id": "e"}, {"id": "f", "source_id": "f"}],  # f removed since
            3: [{"id": "g", "source_id": "g"}]}  # no input is assigned to group 3 now
    assert stale_groups(done, rows) == [0, 2, 3]  # group 1: the same inputs (c split into clips)


def test_stale_groups_notices_an_input_or_caption_changed_in_place():
    """Same inputs, same groups: only the signature (size:mtime of the file, then of its caption) tells that
    a file was rewritten under its name. Markers without signatures (older jobs) are judged by ids alone."""
    from latentforge.pipelines.resume import stale_groups

    rows = [{"id": i, "shard": n // 2, "input_signature": f"10:{n}"} for n, i in enumerate(["a", "b", "c", "d"])]
    rows[2]["input_signature"] = "10:2|5:99"  # c's caption rewritten since group 1 was written
    done = {0: [{"id": "a", "source_id": "a", "input_signature": "10:0"},
                {"id": "b0", "source_id": "b", "input_signature": "10:1"}],  # a clip of b
            1: [{"id": "c", "source_id": "c", "input_signature": "10:2|5:1"},
                {"id": "d", "source_id": "d", "input_signature": "10:3"}]}
    assert stale_groups(done, rows) == [1]
    legacy = {g: [{k: v for k, v in r.items() if k != "input_signature"} for r in group] for g, group in done.items()}
    assert stale_groups(legacy, rows) == []


def test_a_caption_changed_in_place_is_curated_again_on_rerun(tmp_path, ray_local, caplog):
    """A sidecar caption fixed after the job ran (same file name): the rerun redoes its group, whose marker
    named the old signature, so the dataset holds the new caption; the other groups keep their tars."""
    import os

    from latentforge.pipelines.discover import discover

    corpus = tmp_path / "corpus"
    generate_demo_corpus(corpus, DemoCorpusSpec(num_images=4, num_videos=1, num_audio=1, seed=15, include_broken=False))
    cfg = CurationConfig(input_dir=corpus, samples_per_shard=3)
    out = tmp_path / "ds"
    run_curation(cfg, out)
    shard_dir = out / mf.SHARDS
    rows = discover(corpus, cfg.samples_per_shard)
    target = next(r for r in rows if r["relpath"].startswith("images/") and (corpus / r["caption_path"]).is_file())
    group = target["shard"]
    untouched = {p: p.stat().st_mtime_ns for p in shard_dir.glob("*.tar") if not p.name.startswith(f"shard-{group:06d}")}
    assert untouched

    caption = corpus / target["caption_path"]
    caption.write_text("a corrected caption of a shape")
    stat = caption.stat()
    os.utime(caption, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a coarse file system could keep the time
    caplog.set_level("WARNING", logger="latentforge.pipelines.curate")
    result = run_curation(cfg, out)

    assert "1 finished shard groups redone because their inputs changed" in caplog.text
    [row] = [r for r in mf.Dataset(out).manifest().to_pylist() if r["id"] == target["id"]]
    assert row["caption"] == "a corrected caption of a shape"
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched  # the other groups were not redone
    assert result.inputs == len(rows) and sorted(set(accounted(out))) == sorted(r["id"] for r in rows)


def test_a_file_added_goes_to_a_new_group_and_the_finished_groups_keep_their_tars(tmp_path, ray_local, caplog):
    """A file that sorts first would shift every group discovery cuts from the sorted list; the finished groups
    keep their inputs and tars instead, and the new file, with the inputs of a group a stopped job left without
    its marker (tars written, marker not), goes to new groups after the last; that group's tars are removed."""
    import numpy as np
    from PIL import Image

    from latentforge.pipelines.discover import discover, sample_id

    corpus = tmp_path / "corpus"
    generate_demo_corpus(corpus, DemoCorpusSpec(num_images=4, num_videos=1, num_audio=1, seed=13, include_broken=False))
    cfg = CurationConfig(input_dir=corpus, samples_per_shard=2)
    out = tmp_path / "ds"
    run_curation(cfg, out)
    shard_dir = out / mf.SHARDS
    old = {r["id"]: r["shard"] for r in discover(corpus, cfg.samples_per_shard)}
    n = len(set(old.values()))  # groups 0 .. n-1
    marker_path(shard_dir, 1).unlink()  # group 1 stopped between its tars and its marker
    orphans = sorted(p.name for p in shard_dir.glob("shard-000001-*.tar"))
    kept = {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("*.tar") if p.name not in orphans}
    assert orphans and kept

    added = corpus / "a_added.png"  # sorts before audio/, images/ and videos/: discovery puts it in group 0
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(added)
    rows = discover(corpus, cfg.samples_per_shard)
    assert rows[0]["id"] == sample_id("a_added.png") and rows[0]["shard"] == 0
    caplog.set_level("WARNING", logger="latentforge.pipelines.curate")
    result = run_curation(cfg, out)

    assert f"3 inputs no finished group holds go to shard groups {n}-{n + 1}" in caplog.text
    assert result.groups == {"kept": n - 1, "redone": 0, "new": 2}
    assert result.metrics()["groups_kept"] == n - 1
    assert "redone" not in caplog.text
    assert result.inputs == len(rows) and sample_id("a_added.png") in accounted(out)
    assert sorted(set(accounted(out))) == sorted(r["id"] for r in rows)  # every input, and nothing else
    assert result.kept + result.rejected + result.filtered == result.samples == len(accounted(out))
    tars = {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("*.tar")}
    assert {name: tars.get(name) for name in kept} == kept  # finished groups: not rewritten
    assert not set(orphans) & set(tars)  # the stopped group's tars went; its inputs are in the new groups
    assert sorted(tars) == sorted(s["name"] for s in mf.Dataset(out).card["shards"])  # no stray tar left
    holds = {g: {r["source_id"] for r in json.loads(marker_path(shard_dir, g).read_text())["rows"]} for g in (n, n + 1)}
    assert sample_id("a_added.png") in holds[n] and holds[n] | holds[n + 1] == {sample_id("a_added.png")} | {
        i for i, g in old.items() if g == 1}
    samples = {r["id"]: r["shard"] for r in mf.Dataset(out).manifest().to_pylist()}
    assert all(samples[i] == f"shard-{g:06d}-00.tar" for i, g in old.items() if i in samples and g != 1)
    markers = sorted(p.name for p in (shard_dir / DONE_DIR).glob("group-*.json"))
    assert markers == [f"group-{g:06d}.json" for g in range(n + 2) if g != 1]

    # and a rerun of the grown corpus has nothing to do
    caplog.clear()
    again = run_curation(cfg, out)
    assert again.stage_seconds == {} and {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("*.tar")} == tars
    assert again.groups == {"kept": n + 1, "redone": 0, "new": 0}
    assert f"{n + 1} of {n + 1} shard groups already done, 0 inputs to go" in caplog.text

    # the grown dataset's small groups compacted (`select --repack`, no `where`): the same samples in one tar
    from latentforge.datasets.select import select_dataset
    from latentforge.datasets.verify import verify_dataset

    packed = select_dataset(out, tmp_path / "packed", None, repack=True)
    assert len(packed["shards"]) == 1 < len(tars) and packed["num_samples"] == mf.Dataset(out).card["num_samples"]
    assert sorted(mf.Dataset(tmp_path / "packed").manifest()["id"].to_pylist()) == sorted(samples)
    report = verify_dataset(tmp_path / "packed")
    assert report.ok and report.checked["samples"] == len(samples), report.problems


def test_a_file_removed_from_a_finished_group_leaves_the_dataset_on_resume(tmp_path, ray_local, caplog):
    """The first group loses an input, then the last group all of its: only the group that lost one is redone (an
    emptied one dropped), the others keep their tars untouched (none shifts, although discovery's index moved
    every input after the first), and the removed inputs leave the manifest and rejects."""
    from latentforge.pipelines.discover import discover

    corpus = tmp_path / "corpus"
    generate_demo_corpus(corpus, DemoCorpusSpec(num_images=4, num_videos=1, num_audio=1, seed=14, include_broken=False))
    cfg = CurationConfig(input_dir=corpus, samples_per_shard=3)  # 11 inputs: the last group holds 2
    out = tmp_path / "ds"
    run_curation(cfg, out)
    shard_dir = out / mf.SHARDS
    rows = discover(corpus, cfg.samples_per_shard)
    last = rows[-1]["shard"]
    assert [r["shard"] for r in rows[-2:]] == [last, last]
    assert rows[0]["shard"] == 0 and last > 1

    caplog.set_level("WARNING", logger="latentforge.pipelines.curate")
    # the first input, then both inputs of the last group: it is then empty
    for removed in ([rows[0]], rows[-2:]):
        gone = removed[0]
        untouched = {p: p.stat().st_mtime_ns for p in shard_dir.glob("*.tar")
                     if not p.name.startswith(f"shard-{gone['shard']:06d}")}
        assert untouched
        for row in removed:
            (corpus / row["relpath"]).unlink()
        caplog.clear()
        result = run_curation(cfg, out)
        now = discover(corpus, cfg.samples_per_shard)
        assert not {row["id"] for row in removed} & set(accounted(out))
        assert f"1 finished shard groups redone because their inputs changed since they were written " \
               f"(an input removed, or a file or caption changed in place): {gone['shard']}" in caplog.text
        assert sorted(set(accounted(out))) == sorted(r["id"] for r in now)
        assert result.inputs == len(now) and result.kept + result.rejected + result.filtered == result.samples
        assert result.groups == {"kept": last, "redone": 1, "new": 0}  # of groups 0 .. last, all but one kept
        assert {p: p.stat().st_mtime_ns for p in untouched} == untouched  # the other groups were not redone
        card_tars = sorted(s["name"] for s in mf.Dataset(out).card["shards"])
        assert sorted(p.name for p in shard_dir.glob("*.tar")) == card_tars  # no stale tar left
    assert not marker_path(shard_dir, last).exists()  # the emptied group's marker went with its tars


def test_the_dataset_is_refused_when_it_holds_rows_of_inputs_not_in_the_job(tmp_path):
    """Every input exactly once, both ways: rows of an input the job did not discover (what a stale resume
    marker carried in) stop the job before any table is written, as a lost input does."""
    from latentforge.pipelines.curate import write_dataset

    rows = [{"id": "sa"}, {"id": "sb"}]
    meta = [{"id": i, "source_id": i, "status": "rejected"} for i in ("sa", "sb", "sgone")]
    with pytest.raises(RuntimeError, match="rows of 1 inputs that are not inputs of this job.*sgone"):
        write_dataset(meta, rows, CurationConfig(), tmp_path / "ds")
    with pytest.raises(RuntimeError, match="lost track of 1 inputs"):
        write_dataset(meta[:1], rows, CurationConfig(), tmp_path / "ds")
    assert not (tmp_path / "ds").exists()
