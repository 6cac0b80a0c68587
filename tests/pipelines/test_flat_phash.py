"""A flat picture (black, one colour) has no structure for a perceptual hash: it gets none, only exact dedup."""
from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from lf_batches import to_batch
from PIL import Image

from latentforge.datasets.demo_corpus import encode_video
from latentforge.pipelines.config import FilterConfig
from latentforge.pipelines.discover import discover
from latentforge.pipelines.stage import rows_of
from latentforge.pipelines.duplicates import apply_duplicates, find_duplicates, near_pairs
from latentforge.pipelines.stages.dedup import (
    ContentHash,
    DedupConfig,
    grey_thumbnail,
    phash,
    phash_of_grey,
)
from latentforge.pipelines.stages.filter_basic import FilterBasic
from latentforge.pipelines.stages.probe_media import ProbeMedia
from latentforge.pipelines.stages.split_clips import ClipSplitConfig, SplitClips

DEDUP = DedupConfig()


def textured(seed: int, size: tuple[int, int] = (64, 80)) -> np.ndarray:
    """A smooth random image (as in test_dedup): structure a perceptual hash tells apart."""
    small = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((size[1], size[0]), Image.Resampling.BICUBIC))


def stage_cfg(clips: ClipSplitConfig | None = None) -> SimpleNamespace:
    return SimpleNamespace(dedup=DEDUP, clips=clips or ClipSplitConfig(), decode_timeout_s=30.0,
                           filters=FilterConfig(min_side=8))


def hashed(root: Path, cfg: SimpleNamespace, split: bool = False) -> dict[str, dict]:
    batch = FilterBasic(cfg)(ProbeMedia(cfg)(to_batch(discover(root, samples_per_shard=16))))
    if split:
        batch = SplitClips(cfg)(batch)
    rows = rows_of(ContentHash(cfg)(batch))
    assert all(r["status"] == "ok" for r in rows), [(r["relpath"], r["message"]) for r in rows]
    return {f"{r['relpath']}#{r.get('clip_index', -1)}": r for r in rows}


def faded(seed: int) -> np.ndarray:
    """Nine frames of a picture of its own, black in the middle third (a fade through black)."""
    frames = np.stack([textured(seed + k) for k in range(9)])
    frames[3:6] = 0
    return frames


def test_a_flat_thumbnail_has_no_phash():
    # Black hashed to all zeros and one colour to floating-point noise: either matched unrelated pictures.
    for value in (0, 1, 37, 128, 255):
        assert phash(np.full((48, 64, 3), value, np.uint8)) == "", value
    assert phash(np.full((48, 64, 3), (200, 30, 90), np.uint8)) == ""
    nearly_black = np.random.default_rng(0).integers(0, 2, (32, 32), dtype=np.uint8)  # codec noise, no picture
    assert phash_of_grey(nearly_black) == ""


def test_pictures_keep_the_hashes_they_had():
    """Resume compares hashes with an earlier run's, so a picture's hash must not change."""
    assert phash(textured(1, (96, 128))) == "8ce3d8b83acbc534"
    assert phash(textured(7, (120, 160))) == "a159a35ba25e5da1"
    dim = (textured(3) // 16).astype(np.uint8)  # dark and low in contrast, but a picture
    assert phash(dim) == phash_of_grey(grey_thumbnail(dim)) != ""


def test_videos_fading_through_black_are_not_near_duplicates(tmp_path: Path):
    encode_video(tmp_path / "one.mp4", faded(0), 8)
    encode_video(tmp_path / "two.mp4", faded(50), 8)
    rows = hashed(tmp_path, stage_cfg())
    assert [r["phash"] for r in rows.values()] == ["", ""]  # no near-dup hash from a black middle frame
    assert find_duplicates(list(rows.values()), DEDUP) == {}


def test_a_clip_whose_middle_frame_is_black_has_no_phash(tmp_path: Path):
    picture = np.stack([textured(90)] * 16)
    encode_video(tmp_path / "v.mp4", np.concatenate([picture, np.zeros_like(picture)]), 8)  # 2 s, then 2 s black
    rows = hashed(tmp_path, stage_cfg(ClipSplitConfig(enabled=True, min_seconds=1.0, max_seconds=4.0)), split=True)
    assert list(rows) == ["v.mp4#0", "v.mp4#1"]
    assert len(rows["v.mp4#0"]["phash"]) == 16 and rows["v.mp4#1"]["phash"] == ""


def test_flat_images_meet_only_their_exact_copies(tmp_path: Path):
    for name, colour in (("black", (0, 0, 0)), ("red", (220, 20, 20)), ("blue", (20, 20, 220)),
                         ("grey", (128, 128, 128)), ("white", (255, 255, 255))):
        Image.new("RGB", (80, 64), colour).save(tmp_path / f"{name}.png")
    shutil.copy(tmp_path / "red.png", tmp_path / "red_copy.png")
    Image.fromarray(textured(1)).save(tmp_path / "picture.png")
    rows = hashed(tmp_path, stage_cfg())
    assert {k: r["phash"] for k, r in rows.items() if r["phash"] == ""}.keys() == {
        f"{n}.png#-1" for n in ("black", "red", "blue", "grey", "white", "red_copy")}
    dups = find_duplicates(list(rows.values()), DEDUP)
    red, copy = rows["red.png#-1"]["id"], rows["red_copy.png#-1"]["id"]
    assert dups == {max(red, copy): (min(red, copy), "exact")}
    marked = {r["relpath"]: r for r in apply_duplicates(list(rows.values()), dups)}
    assert sum(r["status"] == "filtered" for r in marked.values()) == 1


def test_near_pairs_skip_rows_without_a_phash():
    hashes = ["00000000000000ff", "", "00000000000000fe", "", "ffffffffffffffff"]
    assert near_pairs(hashes, 4) == {(0, 2)}
    assert near_pairs(["", ""], 4) == set()
