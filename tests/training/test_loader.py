"""The streaming shard loader: readers split a manifest selection, per-channel normalisation, one bucket per
batch, a seeded order that resumes mid-epoch, bounded memory."""

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
from latentforge.training.loader import (
    LatentNormalizer,
    StreamPlan,
    build_stream,
    load_batches,
    rank_plan,
    repa_feature_dim,
    select_entries,
)

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


def write_dataset(root: Path, samples: list[LatentSample], shards: int = 3, card: dict | None = None) -> Dataset:
    rows = []
    for shard_index in range(shards):
        name = f"shard-{shard_index:06d}.tar"
        with LatentShardWriter(root / mf.SHARDS / name) as writer:
            for s in sorted(samples[shard_index::shards], key=lambda s: s.key):
                writer.write_sample(s)
                rows.append(manifest_row(s, name))
    mf.write_table(mf.to_table(rows, mf.MANIFEST_SCHEMA), root / mf.MANIFEST)
    (root / mf.CARD).write_text(json.dumps(card or CARD))
    return Dataset(root)


def plan_for(ds: Dataset, st: TrainStageConfig, readers: int = 1, seed: int = 0, repa: bool = False) -> StreamPlan:
    return StreamPlan(select_entries(ds, st), st, LatentNormalizer(ds.card), seed, readers=readers, repa=repa)


def captions_of(batches) -> list[str]:
    return [c for b in batches for c in b.captions]


@pytest.mark.parametrize("readers", [1, 2, 3, 5])
def test_readers_are_disjoint_and_cover_the_selection_every_epoch(dataset, readers: int) -> None:
    ds, _, rows = dataset
    st = stage(batch_size=2, modalities=["image", "video", "audio"])
    selection = {f"caption {int(k[1:])}" for k in expected_ids(rows, {"image", "video", "audio"})}
    plan = plan_for(ds, st, readers)
    shares = [len(plan.share(r, 0)) for r in range(readers)]  # equal sample counts, whatever the shards
    assert max(shares) - min(shares) <= 1 and sum(shares) == len(selection)
    for epoch in (0, 1):
        seen = []
        for reader in range(readers):
            batches = list(plan.read_epoch(reader, epoch))
            assert batches, f"reader {reader} got nothing in epoch {epoch}"
            short = Counter()
            for b in batches:
                shape = tuple(b.latent.shape[1:])
                assert 1 <= len(b.captions) <= 2 and shape in set(SHAPES.values())
                assert b.latent.shape[0] == b.text.shape[0] == b.text_mask.shape[0] == b.modality.shape[0]
                short[shape] += len(b.captions) < 2
            assert max(short.values(), default=0) <= 1  # only a bucket's last batch of the epoch is short
            seen += captions_of(batches)
        assert len(seen) == len(set(seen)) and set(seen) == selection


def test_batch_content_matches_the_shards_normalised(dataset) -> None:
    ds, samples, _ = dataset
    norm = LatentNormalizer(CARD)
    by_caption = {s.caption: s for s in samples}
    st = stage(batch_size=3, frames_as_images=True)
    batches = list(plan_for(ds, st, 2).read_epoch(1, 0)) + list(plan_for(ds, st, 2).read_epoch(0, 0))
    assert {tuple(b.latent.shape[1:]) for b in batches} == {SHAPES["image"], SHAPES["image_large"], SHAPES["audio"]}
    for b in batches:
        assert b.latent.dtype == torch.float32 and b.text_mask.dtype == torch.bool and b.repa is None
        for j, caption in enumerate(b.captions):
            s = by_caption[caption]
            modality = s.meta["modality"]
            full = norm.normalize(s.latent, modality)
            if modality == "video":  # one of the clip's own frames, as an image
                assert any(np.allclose(b.latent[j, :, 0].numpy(), full[:, t]) for t in range(full.shape[1]))
                assert b.modality[j].item() == MODALITY_IDS["image"]
            else:
                np.testing.assert_allclose(b.latent[j].numpy(), full, rtol=1e-6)
                assert b.modality[j].item() == MODALITY_IDS[modality]
            np.testing.assert_array_equal(b.text[j].numpy(), s.text)
            np.testing.assert_array_equal(b.text_mask[j].numpy(), s.text_mask)


def test_order_is_fixed_by_seed_and_changes_with_epoch_and_seed(dataset) -> None:
    ds, _, _ = dataset
    st = stage(batch_size=2)
    a, b = plan_for(ds, st, 2, seed=3), plan_for(ds, st, 2, seed=3)
    for x, y in zip(a.read_epoch(1, 2), b.read_epoch(1, 2), strict=True):
        assert x.captions == y.captions and torch.equal(x.latent, y.latent)
    epochs = [captions_of(a.read_epoch(0, e)) for e in range(3)]
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]
    assert captions_of(a.read_epoch(0, 0)) != captions_of(plan_for(ds, st, 2, seed=4).read_epoch(0, 0))


def test_tokens_per_batch_sets_each_buckets_batch_size(dataset) -> None:
    ds, _, _ = dataset
    st = stage(tokens_per_batch=256)  # image 64 tokens -> 4, video 256 -> 1, audio 8 -> 32
    plan = plan_for(ds, st)
    assert plan.batch_size(SHAPES["image"]) == 4 and plan.batch_size(SHAPES["video"]) == 1
    for b in plan.read_epoch(0, 0):
        assert len(b.captions) <= plan.batch_size(tuple(b.latent.shape[1:]))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_continues_with_exactly_the_same_batches(dataset, workers: int) -> None:
    ds, _, _ = dataset
    st = stage(batch_size=2, loader={"workers": workers, "shuffle_buffer": 3})
    norm = LatentNormalizer(ds.card)
    full = list(itertools.islice(build_stream(rank_plan(ds, st, norm, seed=1, world=2), 1, 0), 14))
    resumed = list(itertools.islice(build_stream(rank_plan(ds, st, norm, seed=1, world=2), 1, 5), 9))
    assert len(full) == 14 and len(set(map(tuple, (b.captions for b in full)))) > 4  # spans several epochs
    for x, y in zip(full[5:], resumed, strict=True):
        assert x.captions == y.captions and torch.equal(x.latent, y.latent) and torch.equal(x.text, y.text)


def test_memory_is_bounded_by_the_shuffle_buffer_not_the_share(tmp_path: Path) -> None:
    samples = [make_sample(i, "image" if i % 4 else "image_large") for i in range(60)]
    ds = write_dataset(tmp_path / "many", samples, shards=2)
    st = stage(batch_size=3, modalities=["image"], loader={"shuffle_buffer": 5})
    plan = plan_for(ds, st)
    batches = list(plan.read_epoch(0, 0))
    assert len(captions_of(batches)) == 60
    # buffer + each bucket's partial batch + the sample just read
    assert plan.peak_held <= 5 + 2 * (3 - 1) + 1 < 60


def test_selection_follows_where_and_the_validation_split(dataset) -> None:
    ds, _, rows = dataset
    st = stage(modalities=["audio", "image"], where="score_caption_words >= 6")
    selection = expected_ids(rows, {"audio", "image"}, min_words=6)
    assert 0 < len(selection) < len(expected_ids(rows, {"audio", "image"}))
    plan = plan_for(ds, st, 2)
    assert sorted(captions_of([*plan.read_epoch(0, 0), *plan.read_epoch(1, 0)])) == sorted(
        f"caption {int(k[1:])}" for k in selection)
    held = stage(modalities=["image", "video", "audio"], val_fraction=0.3)
    train, val = ({e.key for e in select_entries(ds, held, split)} for split in ("train", "val"))
    assert train and val and not train & val
    assert train | val == set(expected_ids(rows, {"image", "video", "audio"}))
    batches = load_batches(ds, held, LatentNormalizer(CARD), split="val", limit=2)
    assert sorted(captions_of(batches)) == sorted(f"caption {int(k[1:])}" for k in sorted(val)[:2])


def test_a_selection_smaller_than_the_readers_is_refused(dataset) -> None:
    ds, _, rows = dataset
    n = len(expected_ids(rows, {"video"}))
    assert plan_for(ds, stage(modalities=["video"]), n)  # one sample per reader is fine
    with pytest.raises(ValueError, match=f"selects {n} samples, fewer than {n + 1} readers"):
        plan_for(ds, stage(modalities=["video"]), n + 1)
    with pytest.raises(ValueError, match="selects 0 samples"):
        plan_for(ds, stage(modalities=["image"], where="score_caption_words > 100"))


def test_a_manifest_naming_a_shard_outside_the_dataset_is_refused(dataset) -> None:
    ds, _, rows = dataset
    rows = [dict(rows[1], shard="../../elsewhere.tar")] + rows[2:]
    mf.write_table(mf.to_table(rows, mf.MANIFEST_SCHEMA), ds.root / mf.MANIFEST)
    with pytest.raises(ValueError, match="outside"):
        select_entries(ds, stage(modalities=["image", "video", "audio"]))


def test_bad_shards_are_refused_clearly(tmp_path: Path) -> None:
    import io
    import tarfile

    from latentforge.datasets.shards import ShardFormatError, encode_members

    samples = [make_sample(i, "image") for i in range(4)]
    ds = write_dataset(tmp_path / "ds", samples, shards=1)
    st = stage(modalities=["image"])
    shard = ds.root / mf.SHARDS / "shard-000000.tar"
    rows = mf.Dataset(ds.root).manifest().to_pylist()
    mf.write_table(mf.to_table(rows + [dict(rows[0], id="s999")], mf.MANIFEST_SCHEMA), ds.root / mf.MANIFEST)
    with pytest.raises(ShardFormatError, match="missing.*s999"):
        list(plan_for(ds, st).read_epoch(0, 0))
    mf.write_table(mf.to_table(rows, mf.MANIFEST_SCHEMA), ds.root / mf.MANIFEST)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(ShardFormatError, match="truncated|corrupt"):
        list(plan_for(ds, st).read_epoch(0, 0))
    with tarfile.open(shard, "w") as tar:  # a member that would need pickle is refused, not decoded
        for name, payload in {**encode_members(samples[0]), "pyd": b"\x80\x04N."}.items():
            info = tarfile.TarInfo(f"{samples[0].key}.{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(ShardFormatError, match="unexpected member 'pyd'"):
        list(plan_for(ds, st).read_epoch(0, 0))


def test_the_lean_reader_decodes_what_the_webdataset_reader_decodes(tmp_path: Path) -> None:
    from latentforge.datasets.shards import iter_shards
    from latentforge.training.shard_reader import NpyDecoder, iter_raw_samples

    rng = np.random.default_rng(0)
    samples = [make_sample(i, kind) for i, kind in enumerate(["image", "audio", "video", "image"])]
    for s in samples[:2]:
        s.repa = rng.standard_normal((64, 8)).astype(np.float16)
    path = tmp_path / "x.tar"
    with LatentShardWriter(path) as w:
        for s in samples:
            w.write_sample(s)
    decode = NpyDecoder()
    for (key, members), ref in zip(iter_raw_samples(str(path)), iter_shards([path]), strict=True):
        assert key == ref.key and str(members["caption.txt"], "utf-8") == ref.caption
        assert json.loads(bytes(members["meta.json"])) == ref.meta
        for name in ("latent", "text", "text_mask", "repa"):
            got = decode(members[f"{name}.npy"]) if f"{name}.npy" in members else None
            want = getattr(ref, name)
            assert (got is None) == (want is None)
            if got is not None:
                assert got.dtype == want.dtype and np.array_equal(got, want)


def test_repa_features_are_collated_or_refused(tmp_path: Path) -> None:
    from latentforge.datasets.shards import ShardFormatError

    samples = [make_sample(i, "image") for i in range(6)]
    for s in samples:
        s.repa = np.full((64, 8), int(s.key[1:]), np.float16)
    card = {**CARD, "encoders": {"repa": {"kind": "dinov2", "model": "tiny", "dim": 8, "tokens": 64}}}
    ds = write_dataset(tmp_path / "repa", samples, shards=2, card=card)
    st = stage(batch_size=4, modalities=["image"])
    assert repa_feature_dim(ds, st) == 8
    for b in plan_for(ds, st, repa=True).read_epoch(0, 0):
        assert b.repa.dtype == torch.float16 and tuple(b.repa.shape) == (len(b.captions), 64, 8)
        assert [int(r[0, 0]) for r in b.repa] == [int(c.split()[1]) for c in b.captions]
    plain = write_dataset(tmp_path / "plain", [make_sample(i, "image") for i in range(4)], shards=1)
    with pytest.raises(ValueError, match="sets `repa`, but dataset .* has no REPA features"):
        repa_feature_dim(plain, st)
    with pytest.raises(ShardFormatError, match="has no repa.npy"):
        list(plan_for(plain, st, repa=True).read_epoch(0, 0))


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
