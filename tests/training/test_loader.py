"""The shard loader: rank shares of a manifest selection, per-channel normalisation, one bucket per batch."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from latentforge.datasets import manifest as mf
from latentforge.datasets.manifest import Dataset
from latentforge.datasets.shards import LatentSample, LatentShardWriter
from latentforge.training.config import MODALITY_IDS, TrainStageConfig
from latentforge.training.loader import BucketedBatches, LatentNormalizer, load_rank_samples, select_samples

SHAPES = {"image": (12, 1, 16, 16), "video": (12, 4, 16, 16), "audio": (64, 8, 1, 1), "image_large": (12, 1, 8, 12)}

CARD = {
    "latent_stats": {
        "visual": {"mean": np.linspace(-1, 1, 12).tolist(), "std": np.linspace(0.5, 2.0, 12).tolist()},
        "audio": {"mean": np.linspace(-0.1, 0.1, 64).tolist(), "std": np.linspace(0.1, 1.0, 64).tolist()},
    }
}


def make_sample(index: int, kind: str) -> LatentSample:
    rng = np.random.default_rng(index)
    modality = "image" if kind == "image_large" else kind
    mask = np.zeros(6, dtype=bool)
    mask[: 1 + index % 6] = True
    return LatentSample(
        key=f"s{index:03d}",
        latent=rng.standard_normal(SHAPES[kind]).astype(np.float32),
        text=rng.standard_normal((6, 4)).astype(np.float32),
        text_mask=mask,
        caption=f"caption {index}",
        meta={"modality": modality, "id": f"s{index:03d}"},
    )


def mixed_samples() -> list[LatentSample]:
    kinds = ["image"] * 11 + ["video"] * 5 + ["audio"] * 7 + ["image_large"] * 3
    return [make_sample(i, kind) for i, kind in enumerate(kinds)]


def stage(batch_size: int = 4, frames_as_images: bool = False, **kw) -> TrainStageConfig:
    return TrainStageConfig(name="t", modalities=kw.pop("modalities", ["image", "video", "audio"]),
                            batch_size=batch_size, video_frames_as_images=frames_as_images, **kw)


def batch_order(batches) -> list[list[str]]:
    return [b.captions for b in batches]


# ---------------------------------------------------------------- normaliser


def test_normalizer_standardises_per_channel_and_inverts() -> None:
    norm = LatentNormalizer(CARD)
    for kind in ("image", "video", "audio"):
        latent = make_sample(1, kind).latent
        modality = kind
        family = "audio" if kind == "audio" else "visual"
        mean = np.asarray(CARD["latent_stats"][family]["mean"], np.float32)[:, None, None, None]
        std = np.asarray(CARD["latent_stats"][family]["std"], np.float32)[:, None, None, None]
        z = norm.normalize(latent, modality)
        assert z.shape == latent.shape and z.dtype == np.float32
        np.testing.assert_allclose(z, (latent - mean) / std, rtol=1e-6)
        np.testing.assert_allclose(norm.denormalize(z, modality), latent, atol=1e-5)
    # Statistics computed from data make that data zero-mean, unit-std per channel.
    data = make_sample(5, "video").latent * 3 + 2
    stats = mf.merge_stats([mf.channel_stats(data)])
    z = LatentNormalizer({"latent_stats": {"visual": stats}}).normalize(data, "video")
    np.testing.assert_allclose(z.reshape(12, -1).mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(z.reshape(12, -1).std(1), 1, atol=1e-4)


def test_normalizer_without_a_family_refuses() -> None:
    norm = LatentNormalizer({"latent_stats": {"visual": CARD["latent_stats"]["visual"]}})
    with pytest.raises(KeyError):
        norm.normalize(make_sample(0, "audio").latent, "audio")


# ---------------------------------------------------------------- bucketed batches


def test_every_batch_has_one_shape_and_every_sample_appears_once_per_epoch() -> None:
    samples = mixed_samples()
    loader = BucketedBatches(samples, stage(batch_size=4), LatentNormalizer(CARD), seed=0)
    batches = loader.epoch(0)
    seen = Counter()
    per_shape = Counter()
    for b in batches:
        assert 1 <= len(b.captions) <= 4
        assert b.latent.dtype == torch.float32 and b.text.dtype == torch.float32
        assert b.text_mask.dtype == torch.bool and b.modality.dtype == torch.int64
        assert b.latent.shape[0] == b.text.shape[0] == b.text_mask.shape[0] == b.modality.shape[0] == len(b.captions)
        shape = tuple(b.latent.shape[1:])
        assert shape in {SHAPES[k] for k in SHAPES}
        per_shape[shape] += 1
        seen.update(b.captions)
        # One modality per batch here, because each modality has its own latent shape.
        assert len(set(b.modality.tolist())) == 1
    assert seen == Counter(s.caption for s in samples)
    # ceil(n / batch_size) batches per bucket: only a bucket's last batch is short.
    assert per_shape == {SHAPES["image"]: 3, SHAPES["video"]: 2, SHAPES["audio"]: 2, SHAPES["image_large"]: 1}


def test_batch_content_matches_its_samples_normalised() -> None:
    samples = mixed_samples()
    norm = LatentNormalizer(CARD)
    by_caption = {s.caption: s for s in samples}
    for b in BucketedBatches(samples, stage(batch_size=3), norm, seed=1).epoch(0):
        for j, caption in enumerate(b.captions):
            s = by_caption[caption]
            modality = s.meta["modality"]
            np.testing.assert_allclose(b.latent[j].numpy(), norm.normalize(s.latent, modality), rtol=1e-6)
            np.testing.assert_array_equal(b.text[j].numpy(), s.text)
            np.testing.assert_array_equal(b.text_mask[j].numpy(), s.text_mask)
            assert b.modality[j].item() == MODALITY_IDS[modality]


def test_order_is_fixed_by_seed_and_epoch() -> None:
    samples = mixed_samples()
    norm = LatentNormalizer(CARD)
    a = BucketedBatches(samples, stage(batch_size=2), norm, seed=3)
    b = BucketedBatches(samples, stage(batch_size=2), norm, seed=3)
    assert batch_order(a.epoch(0)) == batch_order(b.epoch(0))
    assert batch_order(a.epoch(5)) == batch_order(b.epoch(5))
    for x, y in zip(a.epoch(2), b.epoch(2)):
        assert torch.equal(x.latent, y.latent)
    assert batch_order(a.epoch(0)) != batch_order(a.epoch(1))
    assert batch_order(a.epoch(0)) != batch_order(BucketedBatches(samples, stage(batch_size=2), norm, 4).epoch(0))
    # Same multiset every epoch: only the order changes.
    assert sorted(itertools.chain(*batch_order(a.epoch(0)))) == sorted(itertools.chain(*batch_order(a.epoch(1))))


def test_iteration_is_endless_epoch_after_epoch() -> None:
    samples = mixed_samples()[:5]
    loader = BucketedBatches(samples, stage(batch_size=2), LatentNormalizer(CARD), seed=0)
    expected = batch_order(loader.epoch(0)) + batch_order(loader.epoch(1)) + batch_order(loader.epoch(2))
    got = [b.captions for b in itertools.islice(iter(loader), len(expected))]
    assert got == expected


def test_video_frames_as_images() -> None:
    samples = [make_sample(i, "video") for i in range(6)] + [make_sample(100 + i, "image") for i in range(3)]
    norm = LatentNormalizer(CARD)
    by_caption = {s.caption: s for s in samples}
    batches = BucketedBatches(samples, stage(batch_size=4, frames_as_images=True), norm, seed=0).epoch(0)
    assert sum(len(b.captions) for b in batches) == 9
    for b in batches:
        assert tuple(b.latent.shape[1:]) == (12, 1, 16, 16)  # videos now share the image bucket
        assert b.modality.tolist() == [MODALITY_IDS["image"]] * len(b.captions)
        for j, caption in enumerate(b.captions):
            full = norm.normalize(by_caption[caption].latent, "video")
            frame = b.latent[j].numpy()
            # The frame is one of the clip's own (normalised) frames.
            assert any(np.allclose(frame[:, 0], full[:, t]) for t in range(full.shape[1])), caption
    # Without the flag the clips stay clips.
    plain = BucketedBatches(samples, stage(batch_size=4), norm, seed=0).epoch(0)
    video = [b for b in plain if b.modality[0].item() == MODALITY_IDS["video"]]
    assert video and all(tuple(b.latent.shape[1:]) == (12, 4, 16, 16) for b in video)


def test_frames_drawn_vary_across_epochs_but_not_across_runs() -> None:
    samples = [make_sample(i, "video") for i in range(8)]
    norm = LatentNormalizer(CARD)

    def frames(loader, epoch):
        return {c: b.latent[j].numpy().tobytes() for b in loader.epoch(epoch) for j, c in enumerate(b.captions)}

    a = BucketedBatches(samples, stage(batch_size=8, frames_as_images=True), norm, seed=0)
    b = BucketedBatches(samples, stage(batch_size=8, frames_as_images=True), norm, seed=0)
    assert frames(a, 0) == frames(b, 0)
    assert frames(a, 0) != frames(a, 1)


def test_no_samples_is_an_error() -> None:
    with pytest.raises(ValueError, match="no samples"):
        BucketedBatches([], stage(), LatentNormalizer(CARD), seed=0)


def test_batch_to_device_keeps_content() -> None:
    batch = BucketedBatches(mixed_samples()[:3], stage(batch_size=3), LatentNormalizer(CARD), 0).epoch(0)[0]
    moved = batch.to("cpu")
    assert torch.equal(moved.latent, batch.latent) and moved.captions == batch.captions


# ---------------------------------------------------------------- rank shares from a dataset on disk


def manifest_row(sample: LatentSample, shard: str, status: str = "ok", words: float = 3.0) -> dict:
    return {"id": sample.key, "uri": f"/raw/{sample.key}", "relpath": sample.key,
            "modality": sample.meta["modality"], "latent_shape": list(sample.latent.shape),
            "bucket": "x".join(map(str, sample.latent.shape)), "caption": sample.caption,
            "score_caption_words": words, "shard": shard, "status": status}


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Dataset, list[LatentSample], list[dict]]:
    """Three shards; one sample per shard filtered; caption length alternates 3 / 7 words."""
    root = tmp_path / "ds"
    samples = mixed_samples()
    rows = []
    for shard_index in range(3):
        name = f"shard-{shard_index:06d}.tar"
        with LatentShardWriter(root / mf.SHARDS / name) as writer:
            for n, s in enumerate(samples[shard_index::3]):
                writer.write_sample(s)
                status = "filtered" if n == 0 else "ok"
                rows.append(manifest_row(s, name, status, words=7.0 if int(s.key[1:]) % 2 else 3.0))
    mf.write_table(mf.to_table(rows, mf.MANIFEST_SCHEMA), root / mf.MANIFEST)
    (root / mf.CARD).write_text(json.dumps(CARD))
    return Dataset(root), samples, rows


def expected_ids(rows: list[dict], modalities: set[str], min_words: float = 0.0) -> list[str]:
    return sorted(r["id"] for r in rows if r["status"] == "ok" and r["modality"] in modalities
                  and r["score_caption_words"] >= min_words)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_rank_shares_are_disjoint_and_cover_the_selection(dataset, world: int) -> None:
    ds, samples, rows = dataset
    st = stage(modalities=["image", "video"])
    selection = expected_ids(rows, {"image", "video"})
    shards, ids = select_samples(ds, st)
    assert [i for _, i in ids] == selection and {n for n, _ in ids} == {0} and len(shards) == 3
    by_key = {s.key: s for s in samples}
    shares = []
    for rank in range(world):
        got = load_rank_samples(ds, st, rank, world)
        keys = [s.key for s in got]
        assert len(keys) == len(set(keys))
        assert sorted(keys) == selection[rank::world]
        for s in got:  # the samples come back whole from the shards
            np.testing.assert_array_equal(s.latent, by_key[s.key].latent)
            assert s.caption == by_key[s.key].caption and s.meta == by_key[s.key].meta
        shares.append(set(keys))
    assert set().union(*shares) == set(selection)
    assert sum(len(s) for s in shares) == len(selection)
    assert max(len(s) for s in shares) - min(len(s) for s in shares) <= 1  # balanced


def test_rank_shares_follow_where_and_skip_unselected_samples(dataset) -> None:
    ds, _, rows = dataset
    st = stage(modalities=["audio", "image"], where="score_caption_words >= 6")
    selection = expected_ids(rows, {"audio", "image"}, min_words=6)
    assert 0 < len(selection) < len(expected_ids(rows, {"audio", "image"}))
    got = sorted(s.key for r in range(2) for s in load_rank_samples(ds, st, r, 2))
    assert got == selection
    filtered = {r["id"] for r in rows if r["status"] == "filtered"}
    assert not filtered & set(got)


def test_a_selection_smaller_than_the_world_is_refused(dataset) -> None:
    ds, _, rows = dataset
    st = stage(modalities=["video"])
    n = len(expected_ids(rows, {"video"}))
    assert load_rank_samples(ds, st, 0, n)  # exactly one sample per rank is fine
    with pytest.raises(ValueError, match=f"selects {n} samples, fewer than {n + 1} workers"):
        load_rank_samples(ds, st, 0, n + 1)
    with pytest.raises(ValueError, match="selects 0 samples"):
        load_rank_samples(ds, stage(modalities=["image"], where="score_caption_words > 100"), 0, 1)


def test_a_manifest_naming_a_shard_outside_the_dataset_is_refused(dataset) -> None:
    ds, samples, rows = dataset
    rows = [dict(rows[1], shard="../../elsewhere.tar")] + rows[2:]
    mf.write_table(mf.to_table(rows, mf.MANIFEST_SCHEMA), ds.root / mf.MANIFEST)
    with pytest.raises(ValueError, match="outside"):
        load_rank_samples(ds, stage(modalities=["image", "video", "audio"]), 0, 1)


def test_loader_end_to_end_from_disk(dataset) -> None:
    ds, _, _ = dataset
    st = stage(batch_size=3, modalities=["image", "video"], frames_as_images=True)
    samples = load_rank_samples(ds, st, 0, 1)
    batches = BucketedBatches(samples, st, LatentNormalizer(ds.card), seed=0).epoch(0)
    assert {tuple(b.latent.shape[1:]) for b in batches} == {SHAPES["image"], SHAPES["image_large"]}
    assert sum(len(b.captions) for b in batches) == len(samples)


def test_stage_lineage_lists_exactly_the_shards_that_feed_the_stage(dataset) -> None:
    from latentforge.training.loader import stage_lineage

    ds, _, rows = dataset
    card = {**ds.card, "id": "demo-abc", "shards": [{"name": f"shard-{i:06d}.tar", "sha256": f"h{i}", "count": 0}
                                                    for i in range(4)]}
    (ds.root / mf.CARD).write_text(json.dumps(card))
    st = stage(modalities=["image", "video"])
    lineage = stage_lineage(ds, st)
    used = {r["shard"] for r in rows if r["status"] == "ok" and r["modality"] in {"image", "video"}}
    entry = lineage["datasets"][0]
    assert entry["id"] == "demo-abc" and entry["samples"] == len(expected_ids(rows, {"image", "video"}))
    assert {s["name"] for s in entry["shards"]} == used and "shard-000003.tar" not in used
    assert all(s["sha256"].startswith("h") for s in entry["shards"])
