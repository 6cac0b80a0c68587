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
    tar = sorted(shard_dir.glob("*.tar"))[0]
    tar.write_bytes(tar.read_bytes()[:-100])
    assert len(done_groups(shard_dir, config_hash(cfg))) == len(done) - 1
