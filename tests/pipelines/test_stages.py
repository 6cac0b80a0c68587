"""The curation stages as plain callables on a real demo corpus: discover -> probe -> filter -> caption -> encode.

No Ray here: each stage is constructed and called on the column batch the way an actor would be. Single stages
on hand-made batches are in test_stage_rows.py, discovery's edge cases in test_discover.py.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from lf_batches import to_batch
from PIL import Image

from latentforge.datasets import audio, media, video
from latentforge.datasets.codec import DctAudioCodec, HaarPixelCodec
from latentforge.datasets.demo_corpus import DemoCorpusSpec, generate_demo_corpus
from latentforge.datasets.manifest import channel_stats
from latentforge.datasets.shards import iter_shards, load_npy, sha256_file
from latentforge.pipelines.config import CurationConfig, FilterConfig
from latentforge.pipelines.curate import SCAN_STAGES, STAGES, active_stages
from latentforge.pipelines.discover import discover, sample_id
from latentforge.pipelines.stage import rows_of
from latentforge.pipelines.duplicates import find_duplicates, mark_duplicates
from latentforge.pipelines.stages.encode_latents import parse_shape
from latentforge.pipelines.stages.encode_text import EncodeText, default_text_model
from latentforge.pipelines.stages.filter_basic import FilterBasic
from latentforge.pipelines.stages.probe_media import ProbeMedia
from latentforge.pipelines.stages.write_shards import HEAVY, META_KEYS, shard_name, write_shard_group

SAMPLES_PER_SHARD = 8
IMAGE_SIZE = 32
VIDEO_FRAMES = 4
AUDIO_RATE = 8000

# What each broken file of the demo corpus must be rejected for: (stage, reason). The reasons are the codes
# documented in media.probe and caption_sidecar; the corpus index only says "rejected" and why in words.
BROKEN = {
    "broken/empty.png": ("probe", "empty_file"),
    "broken/truncated.mp4": ("probe", "decode_error"),
    "broken/noise_video.mp4": ("probe", "decode_error"),
    "broken/unknown_codec.mp4": ("probe", "unsupported_codec"),  # the container parses; no decoder for its codec
    "broken/noise_image.jpg": ("probe", "decode_error"),
    "broken/png_named.wav": ("probe", "extension_mismatch"),
    "broken/text_named.flac": ("probe", "decode_error"),
    "broken/zero_frames.wav": ("probe", "no_content"),
    "broken/bomb.png": ("probe", "too_large"),
    "broken/missing_caption.png": ("caption_sidecar", "missing_caption"),
    "broken/bad_caption.png": ("caption_sidecar", "caption_not_utf8"),
}
# Files the corpus index marks "filtered", by their modality: the filter that must catch them.
FILTERED = {"image": "resolution_below_min", "video": "too_few_frames", "audio": "sample_rate_below_min"}
# Added to the corpus by this module: not in corpus.json.
EXTRA = {
    "corpus.json": ("probe", "unsupported_extension"),
    "links/outside.png": ("discover", "outside_root"),
    "links/caf\\xe9.png": ("discover", "undecodable_name"),  # a Latin-1 name: no table can hold it as it is
}
BUCKETS = {"image": "1x32x32", "video": "4x32x32", "audio": "8000samples@8000Hz"}  # pixel / sample buckets
LATENT_SHAPES = {
    "image": (12, 1, IMAGE_SIZE // 2, IMAGE_SIZE // 2),
    "video": (12, VIDEO_FRAMES, IMAGE_SIZE // 2, IMAGE_SIZE // 2),
    "audio": (64, AUDIO_RATE // 64, 1, 1),
}


def rows_by_relpath(batch: dict[str, np.ndarray]) -> dict[str, dict]:
    n = len(batch["id"])
    return {batch["relpath"][i]: {k: v[i] for k, v in batch.items()} for i in range(n)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    base = tmp_path_factory.mktemp("stages")
    root = base / "c"
    index = generate_demo_corpus(root, DemoCorpusSpec(num_images=3, num_videos=2, num_audio=2))
    # A symlinked file that escapes the root, one that stays inside, and a symlinked directory outside.
    outside = base / "outside"
    outside.mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(outside / "secret.png")
    (outside / "secret.txt").write_text("a secret outside the corpus")
    (root / "links").mkdir()
    (root / "links" / "outside.png").symlink_to(outside / "secret.png")
    (root / "links" / "outside_dir").symlink_to(outside, target_is_directory=True)
    (root / "links" / os.fsdecode(b"caf\xe9.png")).write_bytes((outside / "secret.png").read_bytes())
    return root, index


@pytest.fixture(scope="module")
def cfg(corpus: tuple[Path, dict]) -> CurationConfig:
    return CurationConfig(input_dir=corpus[0], image_size=IMAGE_SIZE, video_frames=VIDEO_FRAMES,
                          audio_sample_rate=AUDIO_RATE, samples_per_shard=SAMPLES_PER_SHARD)


@pytest.fixture(scope="module")
def text_stage(cfg: CurationConfig) -> EncodeText:
    """The real packaged MiniLM, loaded once for the module."""
    return EncodeText(cfg)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_text_model())


@pytest.fixture(scope="module")
def snapshots(cfg: CurationConfig, text_stage: EncodeText) -> list[tuple[str, dict]]:
    """(stage name, batch after it) for discover and every stage in order."""
    rows = discover(cfg.input_dir, cfg.samples_per_shard)
    batch = to_batch(rows)
    out = [("discover", batch)]
    for stage_cls in SCAN_STAGES + active_stages(STAGES, cfg):
        stage = text_stage if stage_cls is EncodeText else stage_cls(cfg)
        batch = stage(batch)
        out.append((stage_cls.name, batch))
        if stage_cls is SCAN_STAGES[-1]:  # the driver's global pass sits between the two halves
            batch = mark_duplicates(batch, find_duplicates(rows_of(batch), cfg.dedup))
    return out


@pytest.fixture(scope="module")
def final(snapshots: list[tuple[str, dict]]) -> dict[str, dict]:
    return rows_by_relpath(snapshots[-1][1])


# ---------------------------------------------------------------- discover


def test_discover_lists_every_non_caption_file_once_sorted_and_sharded(corpus: tuple[Path, dict]) -> None:
    root, index = corpus
    rows = discover(root, samples_per_shard=4)
    relpaths = [r["relpath"] for r in rows]
    assert relpaths == sorted(relpaths)
    assert set(relpaths) == {f["path"] for f in index["files"]} | set(EXTRA)
    assert not any(p.endswith(".txt") for p in relpaths)
    assert not any(p.startswith("links/outside_dir") for p in relpaths)  # symlinked dirs are not followed
    assert [r["shard"] for r in rows] == [i // 4 for i in range(len(rows))]
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids)
    assert all("." not in i and "/" not in i for i in ids)
    assert ids == [sample_id(p) for p in relpaths]  # stable: a function of the relative path only
    for r in rows:
        assert Path(r["uri"]) == root.resolve() / r["relpath"]
        assert Path(r["caption_path"]) == (root.resolve() / r["relpath"]).with_suffix(".txt")


@pytest.mark.parametrize("per_shard", [1, 5, 1000])
def test_discover_assigns_shards_by_samples_per_shard(corpus: tuple[Path, dict], per_shard: int) -> None:
    rows = discover(corpus[0], samples_per_shard=per_shard)
    shards = [r["shard"] for r in rows]
    counts = np.bincount(shards)
    assert shards == sorted(shards)
    assert (counts[:-1] == per_shard).all() and 1 <= counts[-1] <= per_shard
    assert len(counts) == -(-len(rows) // per_shard)


# ---------------------------------------------------------------- the stage chain on the corpus


def test_row_count_and_ids_never_change(snapshots: list[tuple[str, dict]]) -> None:
    first_ids = list(snapshots[0][1]["id"])
    for name, batch in snapshots:
        lengths = {k: len(v) for k, v in batch.items()}
        assert set(lengths.values()) == {len(first_ids)}, (name, lengths)
        assert list(batch["id"]) == first_ids, name
        assert all(isinstance(v, np.ndarray) for v in batch.values()), name


def test_every_corpus_file_ends_as_the_index_expects(corpus: tuple[Path, dict], final: dict[str, dict]) -> None:
    _, index = corpus
    status_of = {"kept": "ok", "filtered": "filtered", "rejected": "rejected"}
    for entry in index["files"]:
        row = final[entry["path"]]
        assert row["status"] == status_of[entry["expect"]], (entry, row["reason"], row["message"])
        if entry["expect"] == "rejected":
            assert (row["stage"], row["reason"]) == BROKEN[entry["path"]], (entry["why"], row["message"])
            assert row["message"]
        elif entry["expect"] == "filtered":
            assert (row["stage"], row["reason"]) == ("filter_basic", FILTERED[entry["modality"]]), entry["why"]
        else:
            assert (row["stage"], row["reason"], row["message"]) == ("", "", "")
    assert {e["path"] for e in index["files"] if e["expect"] == "rejected"} == set(BROKEN)
    for relpath, (stage, reason) in EXTRA.items():
        assert (final[relpath]["status"], final[relpath]["stage"], final[relpath]["reason"]) == (
            "rejected", stage, reason)


def test_a_rejection_is_final(snapshots: list[tuple[str, dict]]) -> None:
    """Once a stage rejects or filters a row, later stages leave its status, stage and reason alone."""
    seen: dict[str, tuple] = {}
    for name, batch in snapshots:
        for i, sid in enumerate(batch["id"]):
            verdict = (batch["status"][i], batch["stage"][i], batch["reason"][i], batch["message"][i])
            if sid in seen:
                assert verdict == seen[sid], name
            elif verdict[0] != "ok":
                assert verdict[1] == name, (name, verdict)  # recorded under the stage that made it
                seen[sid] = verdict


def test_filtered_samples_keep_their_scores(final: dict[str, dict]) -> None:
    filtered = {k: r for k, r in final.items() if r["status"] == "filtered"}
    assert len(filtered) == 4
    for relpath, row in filtered.items():
        if row["modality"] == "image":
            assert row["score_resolution"] == 16.0 and row["width"] == row["height"] == 16
        elif row["modality"] == "video":
            assert row["score_resolution"] == 64.0 and row["num_frames"] == 2
            assert row["score_duration"] == pytest.approx(2 / 8)
        else:
            assert row["score_sample_rate"] == 8000.0 and row["sample_rate"] == 8000
            assert row["score_duration"] == pytest.approx(1.0)
        assert row["latent"] == b"" and row["text_emb"] == b"", relpath  # never encoded


def test_probe_and_scores_of_kept_samples(corpus: tuple[Path, dict], final: dict[str, dict]) -> None:
    _, index = corpus
    for entry in index["files"]:
        if entry["expect"] != "kept":
            continue
        row = final[entry["path"]]
        assert row["modality"] == entry["modality"]
        if entry["modality"] == "audio":
            assert (row["sample_rate"], row["score_sample_rate"]) == (16000, 16000.0)
            assert row["score_duration"] == pytest.approx(1.0) and row["score_resolution"] == 0.0
        else:
            assert (row["width"], row["height"], row["score_resolution"]) == (64, 64, 64.0)
            assert row["decoder"] in ("pil", "decord", "pyav")
        if entry["modality"] == "video":
            assert row["num_frames"] == 16 and row["fps"] == pytest.approx(8.0)
            assert row["score_duration"] == pytest.approx(2.0)
        assert row["caption"] == entry["caption"]
        assert row["score_caption_words"] == float(len(entry["caption"].split()))


def test_kept_latents_decode_to_the_expected_shape_and_content(final: dict[str, dict]) -> None:
    kept = {k: r for k, r in final.items() if r["status"] == "ok"}
    assert sorted(r["modality"] for r in kept.values()) == ["audio"] * 2 + ["image"] * 3 + ["video"] * 2
    size = (IMAGE_SIZE, IMAGE_SIZE)
    for relpath, row in kept.items():
        latent = load_npy(row["latent"])
        expected_shape = LATENT_SHAPES[row["modality"]]
        assert latent.dtype == np.float32 and latent.shape == expected_shape, relpath
        assert parse_shape(row["latent_shape"]) == list(expected_shape)
        assert row["bucket"] == BUCKETS[row["modality"]]
        np.testing.assert_allclose(load_npy(row["lat_stats"]), channel_stats(latent))
        # The codecs are exact, so the latent holds precisely the decoded media.
        if row["modality"] == "image":
            np.testing.assert_array_equal(HaarPixelCodec().decode(latent)[0], media.decode_image(row["uri"], size))
        elif row["modality"] == "video":
            frames, _ = video.decode_video(row["uri"], VIDEO_FRAMES, size)
            np.testing.assert_array_equal(HaarPixelCodec().decode(latent), frames)
        else:
            wave = audio.decode_audio(row["uri"], AUDIO_RATE, AUDIO_RATE)
            np.testing.assert_allclose(DctAudioCodec().decode(latent), wave, atol=1e-5)
            assert np.abs(wave).max() > 0.1  # real sound, not zero padding


def test_text_embeddings_and_masks(final: dict[str, dict], text_stage: EncodeText, tokenizer) -> None:
    kept = [r for r in final.values() if r["status"] == "ok"]
    for row in kept:
        emb, mask = load_npy(row["text_emb"]), load_npy(row["text_mask"])
        assert emb.shape == (32, 384) and mask.shape == (32,) and mask.dtype == np.bool_
        assert json.loads(row["text_encoder"])["dim"] == 384
        n_tokens = len(tokenizer(row["caption"])["input_ids"])
        assert mask.sum() == n_tokens and mask[:n_tokens].all()  # padding sits at the end
        # Each row got its own caption's embedding (batch order kept), matching a one-caption encode.
        alone, _ = text_stage.encoder.encode([row["caption"]])
        np.testing.assert_allclose(emb.astype(np.float32), alone[0], atol=2e-2, rtol=1e-2)
    embs = [load_npy(r["text_emb"]) for r in kept]
    assert not np.allclose(embs[0], embs[1])
    for row in final.values():
        if row["status"] != "ok":
            assert row["text_emb"] == b"" and row["text_mask"] == b""


def test_a_worker_granted_one_thread_rejects_the_broken_files_for_the_same_reasons(
        corpus: tuple[Path, dict], cfg: CurationConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a Ray worker (OMP_NUM_THREADS set) the decoders are held to its threads (video.open_decord); an
    undecodable codec must still read as unsupported_codec, not as a failure of setting the threads."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    probed = {rel: row for rel, row in BROKEN.items() if row[0] == "probe"}
    rows = [r for r in discover(corpus[0], SAMPLES_PER_SHARD) if r["relpath"] in probed]
    out = rows_by_relpath(ProbeMedia(cfg)(to_batch(rows)))
    assert {rel: (r["stage"], r["reason"]) for rel, r in out.items()} == probed


def test_filter_thresholds_come_from_config(cfg: CurationConfig, snapshots: list[tuple[str, dict]]) -> None:
    probed = dict(snapshots)["probe"]
    strict = cfg.model_copy(update={"filters": FilterConfig(min_side=65, min_sample_rate=1000)})
    loose = cfg.model_copy(update={"filters": FilterConfig(min_side=1, min_frames=1, min_sample_rate=1000)})
    strict_out = rows_by_relpath(FilterBasic(strict)(probed))
    loose_out = rows_by_relpath(FilterBasic(loose)(probed))
    probed_visual = [k for k, r in rows_by_relpath(probed).items()
                     if r["status"] == "ok" and r["modality"] in ("image", "video")]
    assert len(probed_visual) == 10  # 5 images + 3 videos + the two caption-less valid PNGs
    for relpath in probed_visual:  # every one is 64 px or smaller: all below a 65 px floor
        row = strict_out[relpath]
        assert (row["status"], row["reason"], row["stage"]) == ("filtered", "resolution_below_min",
                                                                "filter_basic"), relpath
        assert row["score_resolution"] in (16.0, 64.0)
    assert loose_out["audio/aud_00002.wav"]["status"] == "ok"  # 8000 Hz passes a 1000 Hz floor
    assert loose_out["images/img_00003.jpg"]["status"] == "ok"
    assert loose_out["videos/vid_00002.mp4"]["status"] == "ok"


# ---------------------------------------------------------------- shards


def shard_groups(batch: dict[str, np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
    """What groupby("shard") hands map_groups: one batch per shard index."""
    groups = {}
    shards = np.asarray([int(s) for s in batch["shard"]])
    for index in sorted(set(shards.tolist())):
        take = np.flatnonzero(shards == index)
        groups[index] = {k: v[take] for k, v in batch.items()}
    return groups


def test_write_shard_group_writes_exactly_the_kept_samples(
    snapshots: list[tuple[str, dict]], tmp_path: Path
) -> None:
    batch = snapshots[-1][1]
    groups = shard_groups(batch)
    assert len(groups) == -(-len(batch["id"]) // SAMPLES_PER_SHARD)
    written_keys = []
    for index, group in groups.items():
        meta = write_shard_group(group, str(tmp_path))
        ok = group["status"] == "ok"
        kept_ids = sorted(group["id"][ok])
        path = tmp_path / shard_name(index, 0)
        if not kept_ids:
            assert not path.exists()
            assert set(meta["shard_name"]) <= {""}
            continue
        samples = list(iter_shards([path]))
        assert [s.key for s in samples] == kept_ids  # id order inside the shard
        written_keys += kept_ids
        by_id = {group["id"][i]: i for i in range(len(group["id"]))}
        for s in samples:
            i = by_id[s.key]
            np.testing.assert_array_equal(s.latent, load_npy(group["latent"][i]))
            np.testing.assert_array_equal(s.text, load_npy(group["text_emb"][i]).astype(np.float32))
            assert s.text.dtype == np.float32
            np.testing.assert_array_equal(s.text_mask, load_npy(group["text_mask"][i]))
            assert s.caption == group["caption"][i]
            assert set(s.meta) == set(META_KEYS) and s.meta["id"] == s.key
            assert s.meta["modality"] == group["modality"][i] and s.meta["bucket"] == group["bucket"][i]
        # Metadata rows: same rows in the same order, heavy columns dropped, shard name/digest on kept rows.
        assert not set(HEAVY) & set(meta)
        assert set(meta) == (set(group) - set(HEAVY)) | {"shard_name", "shard_sha256"}
        assert list(meta["id"]) == list(group["id"])
        assert "lat_stats" in meta  # the card's statistics still need it
        digest = sha256_file(path)
        for i in range(len(group["id"])):
            expected = (shard_name(index, 0), digest) if ok[i] else ("", "")
            assert (meta["shard_name"][i], meta["shard_sha256"][i]) == expected
        json.dumps(samples[0].meta)
    all_kept = sorted(i for i, s in zip(batch["id"], batch["status"]) if s == "ok")
    assert sorted(written_keys) == all_kept and len(all_kept) == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        shard_name(i, 0) for i, g in groups.items() if (g["status"] == "ok").any())


def test_write_shard_group_with_nothing_kept_writes_no_tar(snapshots: list[tuple[str, dict]],
                                                           tmp_path: Path) -> None:
    batch = snapshots[-1][1]
    take = np.flatnonzero(batch["status"] != "ok")
    group = {k: v[take] for k, v in batch.items()}
    meta = write_shard_group(group, str(tmp_path / "shards"))
    assert not (tmp_path / "shards").exists() or not any((tmp_path / "shards").iterdir())
    assert list(meta["shard_name"]) == [""] * len(take)
    assert len(meta["id"]) == len(take)


def test_tar_members_are_only_npy_txt_json(snapshots: list[tuple[str, dict]], tmp_path: Path) -> None:
    batch = snapshots[-1][1]
    take = np.flatnonzero(batch["status"] == "ok")
    write_shard_group({k: v[take] for k, v in batch.items()}, str(tmp_path))
    (path,) = tmp_path.iterdir()
    with tarfile.open(path) as tar:
        suffixes = {name.split(".", 1)[1] for name in tar.getnames()}
        assert all(m.mtime == 0 for m in tar.getmembers())
    assert suffixes == {"latent.npy", "text.npy", "text_mask.npy", "caption.txt", "meta.json"}
    assert os.path.getsize(path) > 0
