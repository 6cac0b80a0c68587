"""Latent batches for one worker: the stage's manifest selection, this rank's share, one bucket per batch."""
from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from latentforge.datasets.compat import check_compatible, merged_latent_stats
from latentforge.datasets.manifest import Dataset
from latentforge.datasets.shards import LatentSample, iter_shards
from latentforge.training.config import MODALITY_IDS, TrainStageConfig


@dataclass
class Batch:
    latent: torch.Tensor  # (B, C, T, H, W), normalised
    text: torch.Tensor  # (B, L, D)
    text_mask: torch.Tensor  # (B, L) bool
    modality: torch.Tensor  # (B,) int64
    captions: list[str]

    def to(self, device) -> Batch:
        return Batch(self.latent.to(device), self.text.to(device), self.text_mask.to(device),
                     self.modality.to(device), self.captions)


class LatentNormalizer:
    """Per-channel standardisation with the dataset cards' statistics, per latent family."""

    def __init__(self, cards: dict | list[dict]):
        cards = [cards] if isinstance(cards, dict) else cards
        stats = merged_latent_stats(cards) if len(cards) > 1 else cards[0]["latent_stats"]
        self.stats = {
            family: (np.asarray(s["mean"], np.float32), np.asarray(s["std"], np.float32))
            for family, s in stats.items()
        }

    @staticmethod
    def family(modality: str) -> str:
        return "audio" if modality == "audio" else "visual"

    def normalize(self, latent: np.ndarray, modality: str) -> np.ndarray:
        mean, std = self.stats[self.family(modality)]
        return (latent - mean[:, None, None, None]) / std[:, None, None, None]

    def denormalize(self, latent: np.ndarray, modality: str) -> np.ndarray:
        mean, std = self.stats[self.family(modality)]
        return latent * std[:, None, None, None] + mean[:, None, None, None]


def as_list(datasets: Dataset | list[Dataset]) -> list[Dataset]:
    return [datasets] if isinstance(datasets, Dataset) else list(datasets)


def open_datasets(datasets: Dataset | list[Dataset]) -> list[Dataset]:
    """The datasets of a stage, refused when their encoders differ."""
    datasets = as_list(datasets)
    check_compatible([d.card for d in datasets], [str(d.root) for d in datasets])
    return datasets


def select_samples(datasets: Dataset | list[Dataset], stage: TrainStageConfig) -> tuple[list[Path], list[tuple]]:
    """Shard paths and (dataset index, sample id) pairs, sorted, that the stage's selection picks."""
    shards, keys = set(), []
    for n, dataset in enumerate(as_list(datasets)):
        table = dataset.select(stage.where, list(stage.modalities))
        keys += [(n, i) for i in table["id"].to_pylist()]
        shards |= {(n, dataset.shard_path(s)) for s in table["shard"].to_pylist()}
    return [p for _, p in sorted(shards)], sorted(keys)


def load_rank_samples(datasets: Dataset | list[Dataset], stage: TrainStageConfig, rank: int,
                      world: int) -> list[LatentSample]:
    """This rank's share of the selection (every world-th key), read from the shards that hold it."""
    datasets = open_datasets(datasets)
    _, keys = select_samples(datasets, stage)
    if len(keys) < world:
        raise ValueError(f"stage {stage.name!r} selects {len(keys)} samples, fewer than {world} workers")
    mine = set(keys[rank::world])
    out = []
    for n, dataset in enumerate(datasets):
        table = dataset.select(stage.where, list(stage.modalities))
        shards = sorted({dataset.shard_path(s) for s in table["shard"].to_pylist()})
        out += [s for s in iter_shards(shards) if (n, s.key) in mine]
    return out


class BucketedBatches:
    """Endless batches, one latent shape per batch, in an order fixed by (seed, epoch)."""

    def __init__(self, samples: list[LatentSample], stage: TrainStageConfig, normalizer: LatentNormalizer,
                 seed: int):
        if not samples:
            raise ValueError(f"stage {stage.name!r}: no samples on this worker")
        self.samples = samples
        self.stage = stage
        self.normalizer = normalizer
        self.seed = seed

    def epoch(self, epoch: int) -> list[Batch]:
        rng = random.Random(self.seed * 100_003 + epoch)
        items = [self._item(s, rng) for s in self.samples]
        buckets: dict[tuple, list] = {}
        for item in items:
            buckets.setdefault(item[0].shape, []).append(item)
        batches = []
        for shape in sorted(buckets):
            group = buckets[shape]
            rng.shuffle(group)
            step = self.stage.batch_size
            batches += [self._collate(group[i:i + step]) for i in range(0, len(group), step)]
        rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[Batch]:
        epoch = 0
        while True:
            yield from self.epoch(epoch)
            epoch += 1

    def _item(self, sample: LatentSample, rng: random.Random) -> tuple:
        modality = sample.meta["modality"]
        latent = self.normalizer.normalize(sample.latent, modality)
        if modality == "video" and self.stage.video_frames_as_images:
            t = rng.randrange(latent.shape[1])
            latent, modality = latent[:, t:t + 1], "image"
        return latent, sample.text, sample.text_mask, MODALITY_IDS[modality], sample.caption

    @staticmethod
    def _collate(items: list[tuple]) -> Batch:
        latent, text, mask, modality, captions = zip(*items)
        return Batch(
            latent=torch.from_numpy(np.stack(latent)).float(),
            text=torch.from_numpy(np.stack(text)).float(),
            text_mask=torch.from_numpy(np.stack(mask)).bool(),
            modality=torch.tensor(modality, dtype=torch.long),
            captions=list(captions),
        )
