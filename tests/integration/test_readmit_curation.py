"""Readmission on a real curation job: a blurry upscale wins dedup on resolution, the sharpness filter drops it,
and the sharp original it displaced is curated in its place, in a shard group of its own that a rerun reuses;
then, on a corpus that grows and shrinks, copies of finished samples stay their duplicates and a copy whose
representative's file was removed is curated in its place."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image, ImageFilter

from latentforge.datasets import manifest as mf
from latentforge.datasets.shards import iter_shards
from latentforge.pipelines.config import CurationConfig
from latentforge.pipelines.curate import run_curation
from latentforge.pipelines.stages.filter_sharpness import SharpnessConfig

pytestmark = pytest.mark.integration


def detailed(seed: int) -> Image.Image:
    """A smooth random picture with fine grain on it: sharp (Laplacian variance in the hundreds)."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((128, 96), Image.Resampling.BICUBIC)
    grain = np.asarray(base).astype(np.int16) + rng.integers(-40, 40, (96, 128, 3))
    return Image.fromarray(np.clip(grain, 0, 255).astype(np.uint8))


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    original = detailed(1)
    original.save(root / "b_original.png")
    # twice the resolution, so dedup prefers it, and blurred: what an upscaler leaves
    original.resize((256, 192), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(4)).save(root / "a_upscaled.png")
    shutil.copy(root / "a_upscaled.png", root / "c_upscaled_copy.png")
    original.resize((96, 72), Image.Resampling.LANCZOS).save(root / "d_thumbnail.png")
    for seed in (2, 3):
        detailed(seed).save(root / f"other_{seed}.png")
    for path in root.glob("*.png"):
        path.with_suffix(".txt").write_text(f"a picture called {path.stem}")
    return root


def tars_on_disk(root) -> list[str]:
    return sorted(p.name for p in (root / mf.SHARDS).glob("*.tar"))


def readmitting_job(tmp_path, corpus) -> tuple[CurationConfig, dict]:
    """The corpus curated once: the original is readmitted in its filtered upscale's place. Returns the config and
    the kept rows by path."""
    sharp = SharpnessConfig(min_sharpness=40.0)
    cfg = CurationConfig(input_dir=corpus, samples_per_shard=4, image_size=32, sharpness=sharp)
    result = run_curation(cfg, tmp_path / "ds")
    ds = mf.Dataset(tmp_path / "ds")
    kept = {r["relpath"]: r for r in ds.manifest().to_pylist()}
    out = {r["relpath"]: r for r in ds.rejects().to_pylist()}
    assert set(kept) == {"b_original.png", "other_2.png", "other_3.png"} and result.readmitted == 1
    assert result.inputs == len(kept) + len(out) == 6  # every input accounted for, once
    # of the two identical upscales, one won dedup (the smaller id) and the filter dropped it; the other, its exact
    # copy, stays its duplicate (it would fail alike)
    rep, copy = sorted((out["a_upscaled.png"], out["c_upscaled_copy.png"]), key=lambda r: r["id"])
    assert (rep["stage"], rep["reason"]) == ("filter_sharpness", "sharpness_below_min")
    assert (copy["reason"], copy["duplicate_of"]) == ("duplicate_exact", rep["id"])
    original = kept["b_original.png"]["id"]
    # the thumbnail now duplicates the original that was readmitted in the upscale's place
    thumb = out["d_thumbnail.png"]
    assert (thumb["reason"], thumb["duplicate_of"]) == ("duplicate_near", original)
    assert f"after {rep['relpath']}" in thumb["message"]
    # the original was curated in a group after the job's own two (6 inputs, 4 per group), with its latent
    assert kept["b_original.png"]["shard"] == "shard-000002-00.tar"
    assert [s.key for s in iter_shards([tmp_path / "ds" / mf.SHARDS / "shard-000002-00.tar"])] == [original]
    assert {s["name"] for s in ds.card["shards"]} == {r["shard"] for r in kept.values()}
    return cfg, kept


def test_a_duplicate_is_kept_when_its_representative_is_filtered_later(tmp_path, corpus, ray_local):
    cfg, kept = readmitting_job(tmp_path, corpus)
    # a rerun finds every group done, the readmitted one too: nothing runs, the same dataset comes out
    tars = {p: p.stat().st_mtime_ns for p in (tmp_path / "ds" / mf.SHARDS).glob("*.tar")}
    again = run_curation(cfg, tmp_path / "ds")
    assert again.stage_seconds == {} and {p: p.stat().st_mtime_ns for p in tars} == tars
    assert mf.Dataset(tmp_path / "ds").manifest().to_pylist() == list(kept.values())


# Three more curations (~30 s); the readmission planning of a grown and a shrunk corpus is checked without Ray in
# tests/pipelines/test_readmit.py, and finished groups surviving added and removed files in test_curation_resume.
@pytest.mark.heavy
def test_readmission_on_a_corpus_that_grows_and_shrinks(tmp_path, corpus, ray_local):
    cfg, _ = readmitting_job(tmp_path, corpus)
    tars = {p: p.stat().st_mtime_ns for p in (tmp_path / "ds" / mf.SHARDS).glob("*.tar")}
    # inputs added since (sorting last: discovery would give the last of them group 2, the readmitted group's
    # number): the finished groups keep their inputs and tars, the new inputs go to group 3, after every earlier
    # group, and the original's readmission group is reused as it is
    for seed in (4, 5, 6):
        detailed(seed).save(corpus / f"z_new_{seed}.png")
        (corpus / f"z_new_{seed}.txt").write_text("a new picture")
    grown = run_curation(cfg, tmp_path / "ds")
    ds = mf.Dataset(tmp_path / "ds")
    kept = {r["relpath"]: r["shard"] for r in ds.manifest().to_pylist()}
    assert kept["b_original.png"] == "shard-000002-00.tar" and len(kept) == 6 and grown.readmitted == 1
    assert {kept[f"z_new_{seed}.png"] for seed in (4, 5, 6)} == {"shard-000003-00.tar"}
    assert grown.inputs == len(kept) + ds.rejects().num_rows == 9
    assert {p: p.stat().st_mtime_ns for p in tars} == tars  # nothing written before was written again
    assert tars_on_disk(tmp_path / "ds") == sorted(s["name"] for s in ds.card["shards"])  # no stray tar

    # copies of other_2 (a JPEG of it) and other_3 (larger: dedup would prefer it) added, in a new group: both
    # become duplicates of the originals, whose finished group 1 stands (preferring the larger copy would keep both)
    Image.open(corpus / "other_2.png").save(corpus / "z_jpeg_2.jpg", quality=95)
    Image.open(corpus / "other_3.png").resize((256, 192), Image.Resampling.BICUBIC).save(corpus / "z_bigger_3.png")
    for name in ("z_jpeg_2", "z_bigger_3"):
        (corpus / f"{name}.txt").write_text("a copy")
    copies = run_curation(cfg, tmp_path / "ds")
    out = {r["relpath"]: r for r in mf.Dataset(tmp_path / "ds").rejects().to_pylist()}
    ids = {r["relpath"]: r["id"] for r in mf.Dataset(tmp_path / "ds").manifest().to_pylist()}
    for copy, original in (("z_jpeg_2.jpg", "other_2.png"), ("z_bigger_3.png", "other_3.png")):
        assert (out[copy]["reason"], out[copy]["duplicate_of"]) == ("duplicate_near", ids[original])
    assert copies.groups == {"kept": 3, "redone": 0, "new": 1} and "z_bigger_3.png" not in ids

    # then other_2's file removed: group 1 is redone without it, the copies' group is kept, and the JPEG copy,
    # whose representative left the inputs, is readmitted in its place
    (corpus / "other_2.png").unlink()
    (corpus / "other_2.txt").unlink()
    shrunk = run_curation(cfg, tmp_path / "ds")
    ds = mf.Dataset(tmp_path / "ds")
    kept = {r["relpath"]: r["shard"] for r in ds.manifest().to_pylist()}
    assert "other_2.png" not in kept and kept["z_jpeg_2.jpg"] == "shard-000005-00.tar"  # after groups 0-4
    # other_3, curated again with group 1, stays the representative of its larger copy, whose group is kept
    assert kept["other_3.png"] == "shard-000001-00.tar" and "z_bigger_3.png" not in kept
    assert shrunk.groups == {"kept": 3, "redone": 1, "new": 0} and shrunk.readmitted == 2
    assert shrunk.inputs == len(kept) + ds.rejects().num_rows == 10
    assert tars_on_disk(tmp_path / "ds") == sorted(s["name"] for s in ds.card["shards"])  # no stray tar
