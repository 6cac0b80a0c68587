"""Exact and near-duplicate detection: real files through probe -> scores -> hash, then the driver-side pass."""
from __future__ import annotations

import io
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
from lf_batches import to_batch
from PIL import Image
from pydantic import ValidationError

from latentforge.datasets.demo_corpus import draw_shape, encode_video
from latentforge.datasets.video import decode_clip
from latentforge.pipelines.config import FilterConfig
from latentforge.pipelines.discover import discover
from latentforge.pipelines.stage import rows_of
from latentforge.pipelines.duplicates import SETTLED, apply_duplicates, find_duplicates, mark_duplicates, near_pairs
from latentforge.pipelines.stages.dedup import (
    ContentHash,
    DedupConfig,
    clip_span,
    file_digest,
    file_sha256,
    phash,
)
from latentforge.pipelines.stages.filter_basic import FilterBasic
from latentforge.pipelines.stages.probe_media import ProbeMedia
from latentforge.pipelines.stages.split_clips import ClipSplitConfig, SplitClips

DEDUP = DedupConfig()


def textured(seed: int, size: tuple[int, int] = (96, 128)) -> np.ndarray:
    """A smooth random image: enough structure for a perceptual hash to tell images apart."""
    small = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((size[1], size[0]), Image.Resampling.BICUBIC))


def stage_cfg(dedup: DedupConfig = DEDUP, clips: ClipSplitConfig | None = None) -> SimpleNamespace:
    return SimpleNamespace(dedup=dedup, clips=clips or ClipSplitConfig(), decode_timeout_s=30.0,
                           filters=FilterConfig(min_side=8))


def hashed_rows(root: Path, cfg: SimpleNamespace, split: bool = False) -> list[dict]:
    batch = FilterBasic(cfg)(ProbeMedia(cfg)(to_batch(discover(root, samples_per_shard=8))))
    if split:
        batch = SplitClips(cfg)(batch)
    return rows_of(ContentHash(cfg)(batch))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dedup")
    Image.fromarray(textured(1)).save(root / "a.png")
    shutil.copy(root / "a.png", root / "a_copy.png")  # byte-identical, another name
    Image.fromarray(textured(1)).save(root / "a_q70.jpg", quality=70)
    Image.fromarray(textured(1)).resize((64, 48), Image.Resampling.LANCZOS).save(root / "a_small.png")
    Image.fromarray(textured(2)).save(root / "b.png")
    Image.fromarray(textured(3)).save(root / "c.jpg", quality=90)
    t = np.arange(16000) / 16000
    sf.write(str(root / "low.wav"), (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
    sf.write(str(root / "high.wav"), (0.3 * np.sin(2 * np.pi * 880 * t)).astype(np.float32), 16000)
    return root


@pytest.fixture(scope="module")
def rows(corpus: Path) -> list[dict]:
    return hashed_rows(corpus, stage_cfg())


def by_path(rows: list[dict]) -> dict[str, dict]:
    return {r["relpath"]: r for r in rows}


def test_hash_columns(rows: list[dict]):
    r = by_path(rows)
    assert all(len(row["content_sha256"]) == 64 for row in rows)
    assert r["a.png"]["content_sha256"] == r["a_copy.png"]["content_sha256"] != r["a_q70.jpg"]["content_sha256"]
    assert len(r["a.png"]["phash"]) == 16 and int(r["a.png"]["phash"], 16) >= 0
    assert r["low.wav"]["phash"] == r["high.wav"]["phash"] == ""


def test_exact_and_near_duplicates_keep_the_best_copy(rows: list[dict]):
    r = by_path(rows)
    dups = find_duplicates(rows, DEDUP)
    family = ["a.png", "a_copy.png", "a_q70.jpg", "a_small.png"]
    # Representative: highest resolution (a_small is half size), then smallest id.
    rep = min((r[p] for p in family[:3]), key=lambda row: row["id"])
    assert set(dups) == {r[p]["id"] for p in family} - {rep["id"]}
    for p in family:
        if r[p]["id"] == rep["id"]:
            continue
        kind = "exact" if r[p]["content_sha256"] == rep["content_sha256"] else "near"
        assert dups[r[p]["id"]] == (rep["id"], kind)
    assert dups[r["a_small.png"]["id"]][1] == "near"


def test_different_images_and_audio_are_untouched(rows: list[dict]):
    marked = apply_duplicates(rows, find_duplicates(rows, DEDUP))
    for row in marked:
        if row["relpath"] in ("b.png", "c.jpg", "low.wav", "high.wav"):
            assert (row["status"], row["duplicate_of"], row["reason"]) == ("ok", "", "")


def test_apply_marks_duplicates_filtered_with_their_representative(rows: list[dict]):
    dups = find_duplicates(rows, DEDUP)
    marked = by_path(apply_duplicates(rows, dups))
    small = marked["a_small.png"]
    rep_id = dups[small["id"]][0]
    rep_path = next(r["relpath"] for r in rows if r["id"] == rep_id)
    assert (small["status"], small["reason"], small["stage"], small["duplicate_of"]) == (
        "filtered", "duplicate_near", "dedup", rep_id)
    assert rep_path in small["message"]
    assert marked[rep_path]["status"] == "ok" and marked[rep_path]["duplicate_of"] == ""
    assert len(marked) == len(rows)


def test_batch_marking_matches_row_marking(rows: list[dict]):
    dups = find_duplicates(rows, DEDUP)
    batch = to_batch(rows)
    marked = rows_of(mark_duplicates(batch, dups))
    expected = apply_duplicates(rows, dups)
    for got, want in zip(marked, expected):
        for key in ("status", "reason", "stage", "duplicate_of"):
            assert got[key] == want[key]
    assert list(batch["status"]) == [r["status"] for r in rows]  # the input batch is not modified


def test_switches(rows: list[dict]):
    r = by_path(rows)
    only_exact = find_duplicates(rows, DedupConfig(near=False))
    assert set(only_exact) == {max(r["a.png"]["id"], r["a_copy.png"]["id"])}
    assert find_duplicates(rows, DedupConfig(enabled=False)) == {}
    disabled = ContentHash(stage_cfg(DedupConfig(enabled=False)))(to_batch(rows[:2]))
    assert list(disabled["phash"]) == ["", ""]


def test_representative_rule_on_plain_rows():
    def row(i, sha, ph, res):
        return {"id": i, "status": "ok", "modality": "image", "content_sha256": sha, "phash": ph,
                "score_resolution": res, "relpath": f"{i}.png"}

    rows = [row("b", "x", "00000000000000ff", 64.0), row("a", "x", "00000000000000ff", 32.0),
            row("d", "y", "00000000000000fe", 64.0), row("c", "z", "00000000000000fc", 64.0),
            row("e", "w", "ffffffffffffffff", 256.0), {**row("f", "x", "00000000000000ff", 512.0), "status": "rejected"}]
    dups = find_duplicates(rows, DEDUP)
    # b, c, d tie on resolution: smallest id (b) wins; a (lower res) and f (not ok) never lead.
    assert dups == {"a": ("b", "exact"), "c": ("b", "near"), "d": ("b", "near")}
    # an earlier run's representative that stays (SETTLED: an incremental rerun keeps its group) leads, whatever
    # the resolution of the new copies: a (exact copy of b) and d (near) become its duplicates, not b
    settled = [{**r, SETTLED: True} if r["id"] == "d" else r for r in rows]
    assert find_duplicates(settled, DEDUP) == {"a": ("d", "near"), "b": ("d", "near"), "c": ("d", "near")}


def brute_pairs(hashes: list[str], max_distance: int) -> set[tuple[int, int]]:
    v = [int(h, 16) for h in hashes]
    return {(i, j) for i in range(len(v)) for j in range(i + 1, len(v)) if (v[i] ^ v[j]).bit_count() <= max_distance}


@pytest.mark.parametrize("max_distance", [0, 4, 7])
def test_banding_finds_every_pair_brute_force_finds(max_distance: int):
    rng = np.random.default_rng(max_distance)
    values = [int(hi) << 32 | int(lo) for hi, lo in rng.integers(0, 2**32, (200, 2), dtype=np.uint64)]
    for base in values[:100]:  # planted near duplicates at distances 0 .. max_distance + 2
        flips = rng.choice(64, size=int(rng.integers(0, max_distance + 3)), replace=False)
        values.append(base ^ sum(1 << int(b) for b in flips))
    hashes = [f"{v:016x}" for v in values]
    expected = brute_pairs(hashes, max_distance)
    assert len(expected) >= 20  # ~300 hashes, a third or more of the plants within reach
    assert near_pairs(hashes, max_distance) == expected

    rows = [{"id": f"r{i:03d}", "status": "ok", "modality": "image", "content_sha256": f"h{i}", "phash": h}
            for i, h in enumerate(hashes)]
    dups = find_duplicates(rows, DedupConfig(max_distance=max_distance))
    index = {r["id"]: i for i, r in enumerate(rows)}
    reps = [i for i in range(len(rows)) if rows[i]["id"] not in dups]
    assert not brute_pairs([hashes[i] for i in reps], max_distance)  # no two kept rows are near each other
    for dup, (rep, kind) in dups.items():
        assert kind == "near" and rep not in dups
        assert (values[index[dup]] ^ values[index[rep]]).bit_count() <= max_distance


def test_phash_survives_jpeg_and_resize_and_separates_images():
    image = textured(7, (120, 160))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=70)
    variants = [Image.open(io.BytesIO(buffer.getvalue())), Image.fromarray(image).resize((80, 60))]
    base = int(phash(image), 16)
    assert all((base ^ int(phash(v), 16)).bit_count() <= DEDUP.max_distance for v in variants)
    others = [int(phash(textured(s, (120, 160))), 16) for s in range(20, 30)]
    assert min((base ^ o).bit_count() for o in others) > DEDUP.max_distance


def test_clip_rows_hash_their_own_span(tmp_path: Path):
    shots = [draw_shape(64, "circle", "red", "blue", (20 + 2 * k, 32)) for k in range(16)]
    shots += [draw_shape(64, "square", "white", "black", (44 - k, 24 + k)) for k in range(16)]
    encode_video(tmp_path / "two_shots.mp4", np.stack(shots), 8)
    cfg = stage_cfg(clips=ClipSplitConfig(enabled=True, min_seconds=1.0, max_seconds=4.0))
    rows = hashed_rows(tmp_path, cfg, split=True)
    assert [r["clip_index"] for r in rows] == [0, 1]
    assert rows[0]["content_sha256"] != rows[1]["content_sha256"]
    for r in rows:
        middle, _ = decode_clip(r["uri"], r["clip_start_s"], r["clip_end_s"], 1, None, timeout_s=30.0)
        assert r["phash"] == phash(middle[0])
    whole = hashed_rows(tmp_path, cfg)[0]  # without splitting: the whole video's middle frame
    assert "clip_index" not in whole
    assert len(whole["phash"]) == 16 and whole["content_sha256"] not in {r["content_sha256"] for r in rows}


def test_a_video_cut_into_clips_is_read_and_opened_once_for_all_of_them(tmp_path: Path, monkeypatch):
    from latentforge.datasets import video
    from latentforge.pipelines.stages import dedup

    shots = [draw_shape(64, shape, fg, bg, (24 + k, 32)) for shape, fg, bg in
             (("circle", "red", "blue"), ("square", "white", "black"), ("circle", "yellow", "green"))
             for k in range(16)]
    encode_video(tmp_path / "three_shots.mp4", np.stack(shots), 8)
    cfg = stage_cfg(clips=ClipSplitConfig(enabled=True, min_seconds=0.5, max_seconds=1.0))
    clips = SplitClips(cfg)(FilterBasic(cfg)(ProbeMedia(cfg)(to_batch(discover(tmp_path, samples_per_shard=8)))))
    assert len(clips["id"]) == 6  # three 2 s shots, each cut in two
    # the old way, per clip: the whole file hashed with the clip's span, the clip's own middle frame
    expected = [(file_sha256(r["uri"], clip_span(r)),
                 phash(decode_clip(r["uri"], r["clip_start_s"], r["clip_end_s"], 1, None, timeout_s=30.0)[0][0]))
                for r in rows_of(clips)]
    reads, opens, open_decord = [], [], video.open_decord

    def counted(path):
        reads.append(path)
        return file_digest(path)

    def counted_open(path, **kwargs):
        opens.append(path)
        return open_decord(path, **kwargs)

    monkeypatch.setattr(dedup, "file_digest", counted)
    monkeypatch.setattr(video, "open_decord", counted_open)
    video.READERS.forget()  # the readers the expected values were decoded on
    hashed = ContentHash(cfg)(clips)
    assert list(zip(hashed["content_sha256"], hashed["phash"])) == expected
    assert len(reads) == 1 and len(set(hashed["content_sha256"])) == 6
    assert len(opens) == 1  # the six middle frames came from one kept reader


def test_config_is_strict():
    with pytest.raises(ValidationError):
        DedupConfig(max_dist=3)
    with pytest.raises(ValidationError):
        DedupConfig(hash_size=4, max_distance=16)


def test_images_and_whole_videos_are_hashed_from_the_probes_pixels_without_a_second_open(tmp_path: Path,
                                                                                        monkeypatch) -> None:
    from latentforge.datasets import video
    from latentforge.pipelines.stages import dedup
    from latentforge.pipelines.stages.dedup import KEY_GREY

    frames = np.stack([textured(seed, (64, 80)) for seed in range(9)])  # a different picture each frame
    encode_video(tmp_path / "v.mp4", frames, 8)
    encode_video(tmp_path / "w.mp4", frames[::-1], 8)
    Image.fromarray(textured(1)).save(tmp_path / "a.png")
    # large enough for the probe to decode it at a reduced JPEG scale, and stored rotated (EXIF orientation 6)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(textured(2, (320, 480))).save(tmp_path / "b.jpg", quality=90, exif=exif)
    cfg = stage_cfg()
    probed = FilterBasic(cfg)(ProbeMedia(cfg)(to_batch(discover(tmp_path, samples_per_shard=8))))
    assert sorted(probed["modality"]) == ["image", "image", "video", "video"]
    assert all(len(grey) == (4 * DEDUP.hash_size) ** 2 for grey in probed[KEY_GREY])
    rotated = list(probed["relpath"]).index("b.jpg")
    assert (probed["width"][rotated], probed["height"][rotated]) == (320, 480)  # full size, upright
    # the baseline: the same rows with the pixels taken away, so the hash decodes every file itself
    opened = ContentHash(cfg)({**probed, KEY_GREY: np.array([b""] * len(probed["id"]), dtype=object)})

    def no_open(*_a, **_k):
        raise AssertionError("the file was opened again")

    monkeypatch.setattr(video, "decode_video", no_open)  # the hash's own decode of a whole video
    monkeypatch.setattr(dedup, "_image_for_hash", no_open)  # ... and of an image
    hashed = ContentHash(cfg)(probed)
    assert KEY_GREY not in hashed and KEY_GREY not in opened  # the column ends at the hash
    assert list(hashed["phash"]) == list(opened["phash"]) and list(hashed["status"]) == list(opened["status"])
    assert all(hashed["phash"]) and len(set(hashed["phash"])) == 4
