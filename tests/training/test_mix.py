"""`mix`: each modality's share of an epoch, reached by repeating or subsampling its samples, seeded per epoch;
repeated samples decode once and land in every batch planned for them; a resumed stream is the same stream."""
from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from test_loader import make_sample, write_dataset

from latentforge.training.config import TrainStageConfig
from latentforge.training.loader import LatentNormalizer, StreamPlan, build_stream, rank_plan, select_entries

# 30 images, 6 videos, 12 audio clips in 3 shards: images 62% of a plain epoch
KINDS = ["image"] * 30 + ["video"] * 6 + ["audio"] * 12
MIX = {"image": 1.0, "video": 1.0, "audio": 2.0}  # -> 25% / 25% / 50%


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    samples = [make_sample(i, kind) for i, kind in enumerate(KINDS)]
    return write_dataset(tmp_path_factory.mktemp("mix") / "ds", samples), {s.key: s for s in samples}


def stage(**kw) -> TrainStageConfig:
    return TrainStageConfig(name="m", modalities=["image", "video", "audio"], batch_size=4,
                            loader={"workers": 0, "shuffle_buffer": 8}, **kw)


def modality_of(key: str) -> str:
    return KINDS[int(key[1:])]


def test_an_epoch_holds_each_modality_at_its_share(mixed):
    ds, _ = mixed
    plan = StreamPlan(select_entries(ds, stage()), stage(), None, seed=3, readers=2, mix=MIX)
    counts, sizes = Counter(), []
    for epoch in range(40):
        items = [i for r in range(2) for batch in plan.plan(r, epoch) for i, _ in batch]
        sizes.append(len(items))
        counts.update(plan.entries.modalities[plan.entries.modality_index[i]] for i in items)
    total = sum(counts.values())
    shares = {m: counts[m] / total for m in MIX}
    assert shares == pytest.approx({"image": 0.25, "video": 0.25, "audio": 0.5}, abs=0.03)
    assert np.mean(sizes) == pytest.approx(len(KINDS), rel=0.05)  # an epoch keeps its size
    plain = StreamPlan(select_entries(ds, stage()), stage(), None, seed=3, readers=2)
    items = [i for r in range(2) for batch in plain.plan(r, 0) for i, _ in batch]
    assert sorted(items) == list(range(len(KINDS)))  # without mix: every sample once


def test_repeated_samples_decode_once_and_fill_every_batch_they_are_planned_for(mixed):
    ds, samples = mixed
    st = stage(mix=MIX)
    plan = rank_plan(ds, st, LatentNormalizer(ds.card), seed=5, world=1)
    planned = [[plan.entries.key(i) for i, _ in batch] for batch in plan.plan(0, 0)]
    assert max(Counter(k for batch in planned for k in batch).values()) == 2  # videos and audio: 2 copies an epoch
    batches = list(plan.read_epoch(0, 0))
    assert [b.captions for b in batches] == [[samples[k].caption for k in batch] for batch in planned]
    norm = LatentNormalizer(ds.card)
    for batch, keys in zip(batches, planned):
        want = np.stack([samples[k].latent for k in keys])
        assert torch.allclose(batch.latent, torch.from_numpy(norm.normalize(want, modality_of(keys[0]))))
    assert plan.peak_held <= 8 + 3 * 4  # the buffer and the accumulators, as without mix


def test_a_resumed_stream_with_mix_is_the_same_stream(mixed):
    ds, _ = mixed
    st = stage(mix=MIX)
    norm = LatentNormalizer(ds.card)
    full = list(itertools.islice(build_stream(rank_plan(ds, st, norm, seed=1, world=2), 1, 0), 30))
    resumed = list(itertools.islice(build_stream(rank_plan(ds, st, norm, seed=1, world=2), 1, 11), 19))
    for x, y in zip(full[11:], resumed, strict=True):
        assert x.captions == y.captions and torch.equal(x.latent, y.latent)


def test_mix_is_checked_against_the_stage_and_the_selection(mixed):
    ds, _ = mixed
    with pytest.raises(ValidationError, match="exactly the stage's modalities"):
        stage(mix={"image": 1.0, "video": 1.0})
    with pytest.raises(ValidationError, match="must be > 0"):
        stage(mix={"image": 1.0, "video": 0.0, "audio": 1.0})
    st = TrainStageConfig(name="m", modalities=["image", "video"], where="score_caption_words > 100", batch_size=4,
                          mix={"image": 1.0, "video": 1.0})
    images = [e for e in select_entries(ds, stage()) if e.modality == "image"]
    with pytest.warns(UserWarning, match="mix gives video a share, but the selection has no such samples"):
        plan = StreamPlan(images, st, None, seed=0, mix=st.mix)
    assert sorted(i for batch in plan.plan(0, 0) for i, _ in batch) == list(range(len(images)))  # images alone


def test_frames_as_images_draw_a_frame_for_each_copy(tmp_path: Path):
    samples = [make_sample(i, "video") for i in range(4)] + [make_sample(4 + i, "image") for i in range(12)]
    ds = write_dataset(tmp_path / "ds", samples, shards=1)
    st = TrainStageConfig(name="f", modalities=["image", "video"], batch_size=2, video_frames_as_images=True,
                          mix={"image": 1.0, "video": 3.0}, loader={"workers": 0})
    plan = StreamPlan(select_entries(ds, st), st, None, seed=0, mix=st.mix)
    frames = Counter((i, f) for epoch in range(5) for batch in plan.plan(0, epoch) for i, f in batch if f is not None)
    assert len({i for i, _ in frames}) == 4 and len(frames) > 8  # copies of a video differ in frame
