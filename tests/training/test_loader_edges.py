"""Loader edge cases: damaged shards are refused naming the shard, a latent of the wrong shape names its sample
and so do text and REPA members unlike the dataset card or the rest of their batch, a dataset listed twice is
refused up front, and readers take equal sample shares whatever the shard sizes."""

from __future__ import annotations

import itertools
import json
import re
import signal
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from test_loader import CARD, make_sample, manifest_row, write_dataset

from latentforge.datasets import manifest as mf
from latentforge.datasets.manifest import Dataset
from latentforge.datasets.shards import LatentShardWriter, ShardFormatError, encode_members, npy_bytes
from latentforge.training.config import TrainStageConfig
from latentforge.training.loader import (
    LatentNormalizer,
    StreamPlan,
    build_stream,
    load_batches,
    rank_plan,
    select_entries,
)
from latentforge.training.shard_reader import NpyDecoder


def stage(batch_size: int = 2, **kw) -> TrainStageConfig:
    return TrainStageConfig(name="t", modalities=["image"], batch_size=batch_size, **kw)


def plan_for(ds: Dataset, st: TrainStageConfig, readers: int = 1, seed: int = 0, repa: bool = False) -> StreamPlan:
    return StreamPlan(select_entries(ds, st), st, LatentNormalizer(ds.card), seed, readers=readers, repa=repa)


@contextmanager
def deadline(seconds: int):
    """A hang is a failure, not a stuck suite."""
    def expire(*_):
        raise TimeoutError(f"no answer within {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- damaged shards


def member_headers(data: bytes, kind: bytes) -> list[int]:
    return [o for o in range(0, len(data), 512) if data[o + 257:o + 262] == b"ustar" and data[o + 156:o + 157] == kind]


@pytest.mark.parametrize("damage", ["size not octal", "name not utf-8", "pax record of length 0"])
def test_a_corrupt_tar_header_is_a_shard_format_error_naming_the_shard(tmp_path: Path, damage: str) -> None:
    ds = write_dataset(tmp_path / "ds", [make_sample(i, "image") for i in range(4)], shards=1)
    shard = ds.root / mf.SHARDS / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    regular, pax = member_headers(data, b"0"), member_headers(data, b"x")
    assert len(regular) > 3 and pax
    if damage == "size not octal":
        data[regular[2] + 124 + 5] = ord("v")
    elif damage == "name not utf-8":
        data[regular[2] + 3] = 0xD8
    else:  # "13 mtime=0.0\n" -> "00 mtime=0.0\n": a record that never advances
        record = pax[1] + 512
        assert data[record:record + 3] == b"13 "
        data[record:record + 2] = b"00"
    shard.write_bytes(bytes(data))
    with deadline(20), pytest.raises(ShardFormatError, match=rf"{re.escape(str(shard))}: corrupt tar header at byte \d+"):
        list(plan_for(ds, stage()).read_epoch(0, 0))


@pytest.mark.parametrize("member", [b"\x93NUMPY", b"\x93NUMPY\x01\x00", b"\x93NUMPY\x01\x00\x76\x00{'descr'"])
def test_a_short_npy_member_is_a_shard_format_error(tmp_path: Path, member: bytes) -> None:
    with pytest.raises(ShardFormatError, match="x.tar:s1.latent.npy: npy"):
        NpyDecoder()(memoryview(member), "x.tar:s1.latent.npy")
    samples = [make_sample(i, "image") for i in range(2)]
    ds = write_dataset(tmp_path / "ds", samples, shards=1)
    shard = ds.root / mf.SHARDS / "shard-000000.tar"
    with LatentShardWriter(shard) as w:  # the manifest is unchanged: s001's latent member is cut short
        for s in samples:
            w.write(s.key, {**encode_members(s), **({"latent.npy": member} if s.key == "s001" else {})})
    with pytest.raises(ShardFormatError, match=rf"{re.escape(str(shard))}:s001.latent.npy: npy"):
        list(plan_for(ds, stage()).read_epoch(0, 0))


@pytest.mark.parametrize("batch_size", [1, 4])
def test_a_latent_not_of_the_manifest_shape_is_refused_naming_it(tmp_path: Path, batch_size: int) -> None:
    samples = [make_sample(i, "image") for i in range(4)]
    ds = write_dataset(tmp_path / "ds", samples, shards=1)
    shard = ds.root / mf.SHARDS / "shard-000000.tar"
    samples[1].latent = samples[1].latent[:, :, :8]  # the manifest still says (12, 1, 16, 16)
    with LatentShardWriter(shard) as w:
        for s in samples:
            w.write_sample(s)
    with pytest.raises(ShardFormatError, match=rf"{re.escape(str(shard))}: sample s001: latent float32 \(12, 1, 8, 16\), but the "
                                               r"manifest says shape \(12, 1, 16, 16\)"):
        list(plan_for(ds, stage(batch_size)).read_epoch(0, 0))


# ---------------------------------------------------------------- a dataset listed twice


def test_a_dataset_listed_twice_is_refused_when_the_plan_is_made(tmp_path: Path) -> None:
    ds = write_dataset(tmp_path / "ds", [make_sample(i, "image") for i in range(8)], shards=2)
    (tmp_path / "alias").symlink_to(ds.root)
    norm = LatentNormalizer(ds.card)
    for twice in ([ds, Dataset(ds.root)], [ds, Dataset(tmp_path / "alias")], [Dataset(tmp_path / "alias")] * 2):
        with pytest.raises(ValueError, match=f"dataset {ds.root.resolve()} is listed twice"):
            rank_plan(twice, stage(), norm, seed=0, world=1)
    # One manifest naming a sample twice would break the reader the same way: refused by the selection.
    rows = Dataset(ds.root).manifest().to_pylist()
    mf.write_table(mf.to_table(rows + [rows[3]], mf.MANIFEST_SCHEMA), ds.root / mf.MANIFEST)
    with pytest.raises(ValueError, match="sample 's00.' of shard .* is selected twice"):
        rank_plan(ds, stage(), LatentNormalizer(ds.card), seed=0, world=1)


# ---------------------------------------------------------------- equal shares


def uneven_dataset(root: Path, sizes: list[int]) -> tuple[Dataset, list[str]]:
    """Shards of the given sizes; every fourth sample of a shard passes `score_caption_words >= 5`."""
    rows, index, kept = [], 0, []
    for n, size in enumerate(sizes):
        name = f"shard-{n:06d}.tar"
        with LatentShardWriter(root / mf.SHARDS / name) as writer:
            for j in range(size):
                s = make_sample(index, "image")
                writer.write_sample(s)
                rows.append(manifest_row(s, name, words=7.0 if j % 4 == 0 else 3.0))
                kept += [s.caption] if j % 4 == 0 else []
                index += 1
    mf.write_table(mf.to_table(rows, mf.MANIFEST_SCHEMA), root / mf.MANIFEST)
    (root / mf.CARD).write_text(json.dumps(CARD))
    return Dataset(root), kept


def shares(plan: StreamPlan, epoch: int) -> list[list[str]]:
    return [[plan.entries[i].key for batch in plan.plan(r, epoch) for i, _ in batch] for r in range(plan.readers)]


@pytest.mark.parametrize("sizes,readers", [([40, 4, 8, 36, 4, 12], 4),  # uneven after `where`
                                           ([8] * 5, 4),  # just more shards than readers
                                           ([24, 8], 5)])  # fewer shards than readers
def test_readers_take_equal_sample_shares_whatever_the_shard_sizes(tmp_path: Path, sizes, readers) -> None:
    ds, kept = uneven_dataset(tmp_path / "ds", sizes)
    st = stage(where="score_caption_words >= 5", loader={"shuffle_buffer": 3})
    plan = plan_for(ds, st, readers, seed=7)
    for epoch in range(3):
        got = shares(plan, epoch)
        assert max(map(len, got)) - min(map(len, got)) <= 1, [len(s) for s in got]
        flat = [k for s in got for k in s]
        assert len(flat) == len(set(flat)) == len(kept)  # disjoint, and together the whole selection
        assert got == shares(plan_for(ds, st, readers, seed=7), epoch)  # the same deal from seed and epoch
    read = [c for r in range(readers) for b in plan.read_epoch(r, 1) for c in b.captions]
    assert sorted(read) == sorted(kept)


def test_one_global_epoch_of_steps_sees_every_sample_once() -> None:
    """Every rank takes the same number of steps: with equal shares that many steps read each sample once."""
    from latentforge.training.loader import Entry

    st = TrainStageConfig(name="s", modalities=["image"], batch_size=10, loader={"workers": 4})
    entries = [Entry(0, f"k{s}_{i:04d}", f"/d/shard-{s:06d}.tar", (4, 1, 8, 8), "image")
               for s in range(9) for i in range(1000)]
    plan = StreamPlan(entries, st, None, seed=0, readers=8)
    steps = len(entries) // (8 * 10)  # one pass over the selection, in samples
    seen = Counter()
    for r in range(8):  # a reader whose epoch ends first starts its next one
        stream = itertools.chain.from_iterable(plan.plan(r, e) for e in itertools.count())
        seen.update(plan.entries[i].key for b in itertools.islice(stream, steps) for i, _ in b)
    assert max(seen.values()) == 1 and len(seen) == 8 * steps * 10


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_over_split_shards_continues_with_the_same_batches(tmp_path: Path, workers: int) -> None:
    ds, _ = uneven_dataset(tmp_path / "ds", [13, 3])  # fewer shards than 3 ranks x 2 workers: shards are split
    st = stage(batch_size=2, loader={"workers": workers, "shuffle_buffer": 3})
    norm = LatentNormalizer(ds.card)
    full = list(itertools.islice(build_stream(rank_plan(ds, st, norm, seed=1, world=3), 2, 0), 12))
    resumed = list(itertools.islice(build_stream(rank_plan(ds, st, norm, seed=1, world=3), 2, 5), 7))
    for x, y in zip(full[5:], resumed, strict=True):
        assert x.captions == y.captions and torch.equal(x.latent, y.latent) and torch.equal(x.text, y.text)


def test_sample_prompts_come_from_every_bucket_whichever_shards_reader_0_starts_with(tmp_path: Path):
    """Prompts were the first batches of reader 0: with equal runs of shuffled shards, a bucket whose shards all
    fell to other readers had no prompt (the quickstart's finetune lost its audio sample)."""
    from latentforge.training.sampling import pick_prompts

    kinds = ["image"] * 5 + ["video"] * 5 + ["audio"] * 5 + ["image_large"] * 5
    samples = [make_sample(i, kind) for i, kind in enumerate(kinds)]
    rows, root = [], tmp_path / "ds"
    for shard in range(4):  # one bucket per shard, one shard per reader
        name = f"shard-{shard:06d}.tar"
        with LatentShardWriter(root / mf.SHARDS / name) as writer:
            for s in samples[5 * shard:5 * shard + 5]:
                writer.write_sample(s)
                rows.append(manifest_row(s, name))
    mf.write_table(mf.to_table(rows, mf.MANIFEST_SCHEMA), root / mf.MANIFEST)
    (root / mf.CARD).write_text(json.dumps(CARD))
    st = TrainStageConfig(name="t", modalities=["image", "video", "audio"], batch_size=2)
    for seed in range(4):
        plan = plan_for(Dataset(root), st, readers=4, seed=seed)
        assert len({plan.entries[i].shape for i in plan.share(0, 0)}) == 1  # reader 0 alone sees one bucket
        view = plan.prompt_plan(2)
        assert Counter(e.shape for e in view.entries) == {shape: 2 for shape in {e.shape for e in plan.entries}}
        prompts = pick_prompts(list(view.read_epoch(0, 0)), 4)
        assert len({tuple(p.latent.shape) for p in prompts}) == 4  # one from each bucket first


# ---------------------------------------------------------------- text and REPA members unlike the batch or card


TEXT_CARD = {**CARD, "encoders": {"text": {"kind": "minilm", "dim": 4, "max_len": 6}}}
REPA_CARD = {**CARD, "encoders": {"repa": {"kind": "dinov2", "model": "tiny", "dim": 8}}}


def with_odd_member(root: Path, odd: dict[str, np.ndarray], card: dict, repa: bool = False) -> tuple[Dataset, Path]:
    """Four images in one shard whose sample s001 has the members `odd` (written with their own dtype); the
    manifest and the card are those of the good samples."""
    samples = [make_sample(i, "image") for i in range(4)]
    for s in samples:
        s.repa = np.full((64, 8), int(s.key[1:]), np.float16) if repa else None
    ds = write_dataset(root, samples, shards=1, card=card)
    shard = ds.root / mf.SHARDS / "shard-000000.tar"
    with LatentShardWriter(shard) as w:
        for s in samples:
            w.write(s.key, {**encode_members(s), **({name: npy_bytes(a) for name, a in odd.items()}
                                                    if s.key == "s001" else {})})
    return ds, shard


TEXT = make_sample(1, "image").text  # float32 (6, 4)
MASK = make_sample(1, "image").text_mask  # bool (6,)


@pytest.mark.parametrize("odd,found,expected", [
    ({"text.npy": TEXT[:, :3]}, r"text \(6, 3\)", r"\(6, 4\)"),  # another text width
    ({"text.npy": TEXT[:5], "text_mask.npy": MASK[:5]}, r"text \(5, 4\)", r"\(6, 4\)"),  # another text length
], ids=["width", "length"])
def test_a_text_embedding_unlike_the_rest_of_its_batch_is_refused_naming_it(tmp_path: Path, odd, found,
                                                                            expected) -> None:
    ds, shard = with_odd_member(tmp_path / "ds", odd, CARD)  # CARD has no text encoder: the batch is the reference
    with pytest.raises(ShardFormatError, match=rf"{re.escape(str(shard))}: sample s001: {found}, but the 3 other "
                                               rf"samples of its batch have {expected}"):
        list(plan_for(ds, stage(4)).read_epoch(0, 0))


@pytest.mark.parametrize("batch_size", [1, 4])
def test_a_text_embedding_not_of_the_card_shape_is_refused_naming_it(tmp_path: Path, batch_size: int) -> None:
    ds, shard = with_odd_member(tmp_path / "ds", {"text.npy": TEXT[:, :3]}, TEXT_CARD)
    with pytest.raises(ShardFormatError, match=rf"{re.escape(str(shard))}: sample s001: text float32 \(6, 3\), but "
                                               r"the dataset card's text encoder gives float \(6, 4\)"):
        load_batches(ds, stage(batch_size), LatentNormalizer(ds.card))


@pytest.mark.parametrize("card", [CARD, TEXT_CARD], ids=["no-text-card", "text-card"])
def test_a_text_embedding_of_integers_is_refused_naming_it(tmp_path: Path, card: dict) -> None:
    ds, shard = with_odd_member(tmp_path / "ds", {"text.npy": TEXT.astype(np.int64)}, card)
    with pytest.raises(ShardFormatError, match=rf"{re.escape(str(shard))}: sample s001: text int64 \(6, 4\), but "):
        load_batches(ds, stage(4), LatentNormalizer(ds.card))


def test_a_text_mask_not_of_its_text_length_is_refused_naming_it(tmp_path: Path) -> None:
    ds, shard = with_odd_member(tmp_path / "ds", {"text_mask.npy": MASK[:5]}, TEXT_CARD)
    with pytest.raises(ShardFormatError, match=rf"{re.escape(str(shard))}: sample s001: text_mask bool \(5,\), but its "
                                               r"text has 6 tokens"):
        load_batches(ds, stage(4), LatentNormalizer(ds.card))


REPA = np.ones((64, 8), np.float16)  # 16x16 latents: 64 DiT tokens at patch 2


@pytest.mark.parametrize("odd,via,message", [
    (REPA[:, :6], "card", r"repa float16 \(64, 6\), but the dataset card's REPA encoder gives float \(N, 8\)"),
    (REPA[:, :6], "batch", r"repa \(64, 6\), but the 3 other samples of its batch have \(64, 8\)"),
    (REPA[:16], "card", r"repa \(16, 8\), but the 3 other samples of its batch have \(64, 8\)"),
    (REPA.astype(np.int16), "batch", r"repa int16 \(64, 8\), but REPA features are float \(N, D\)"),
], ids=["width-card", "width-batch", "tokens", "int16"])
def test_repa_features_unlike_the_card_or_their_batch_are_refused_naming_them(tmp_path: Path, odd, via,
                                                                              message) -> None:
    """`via` card: load_batches, whose plan knows the card's REPA width; batch: a StreamPlan made without it."""
    ds, shard = with_odd_member(tmp_path / "ds", {"repa.npy": odd}, REPA_CARD, repa=True)
    with pytest.raises(ShardFormatError, match=rf"{re.escape(str(shard))}: sample s001: {message}"):
        if via == "card":
            load_batches(ds, stage(4), LatentNormalizer(ds.card), repa=True)
        else:
            list(plan_for(ds, stage(4), repa=True).read_epoch(0, 0))
