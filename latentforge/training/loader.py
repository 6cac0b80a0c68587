"""Latent batches for one worker: the stage's manifest selection, this rank's share, one bucket per batch."""
from __future__ import annotations

import hashlib
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


def is_validation(key: str, fraction: float) -> bool:
    """A stable held-out split by sample id: the same samples whatever the worker count or order."""
    return fraction > 0 and int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 2**32 < fraction


def select_samples(datasets: Dataset | list[Dataset], stage: TrainStageConfig,
                   split: str = "train") -> tuple[list[Path], list[tuple]]:
    """Shard paths and (dataset index, sample id) pairs, sorted, that the stage's selection picks."""
    where = selection_shards(datasets, stage, split)
    return sorted({p for p in where.values()}), sorted(where)


def selection_shards(datasets: Dataset | list[Dataset], stage: TrainStageConfig,
                     split: str = "train") -> dict[tuple, Path]:
    """(dataset index, sample id) -> the shard holding it, for the samples the stage's selection picks."""
    out = {}
    for n, dataset in enumerate(as_list(datasets)):
        table = dataset.select(stage.where, list(stage.modalities))
        for key, shard in zip(table["id"].to_pylist(), table["shard"].to_pylist()):
            if is_validation(key, stage.val_fraction) == (split == "val"):
                out[(n, key)] = dataset.shard_path(shard)
    return out


def stage_lineage(datasets: Dataset | list[Dataset], stage: TrainStageConfig) -> dict:
    """Exactly which datasets and shards (with checksums) feed a stage: recorded beside its checkpoints."""
    datasets = as_list(datasets)
    out = {"stage": stage.name, "where": stage.where, "modalities": list(stage.modalities), "datasets": []}
    for dataset in datasets:
        card = dataset.card
        table = dataset.select(stage.where, list(stage.modalities))
        used = set(table["shard"].to_pylist())
        out["datasets"].append({
            "id": card.get("id"), "path": str(dataset.root), "samples": table.num_rows,
            "shards": [s for s in card["shards"] if s["name"] in used]})
    return out


def load_rank_samples(datasets: Dataset | list[Dataset], stage: TrainStageConfig, rank: int,
                      world: int, split: str = "train") -> list[LatentSample]:
    """This rank's share of the selection (every world-th key), read from the shards that hold it."""
    datasets = open_datasets(datasets)
    where = selection_shards(datasets, stage, split)
    keys = sorted(where)
    if len(keys) < world:
        raise ValueError(f"stage {stage.name!r} selects {len(keys)} samples, fewer than {world} workers")
    mine = set(keys[rank::world])
    out = []
    for n in range(len(datasets)):  # only the shards that hold this rank's samples are read
        shards = sorted({where[k] for k in mine if k[0] == n})
        out += [s for s in iter_shards(shards) if (n, s.key) in mine]
    return out


def token_count(shape: tuple[int, ...], patch: int) -> int:
    """DiT tokens of one latent (C, T, H, W): visual latents are patchified (1, p, p), audio has H = W = 1."""
    _, t, h, w = shape
    return t if h == w == 1 else t * (h // patch) * (w // patch)


class BucketedBatches:
    """Endless batches, one latent shape per batch, in an order fixed by (seed, epoch).

    An epoch is first planned as lists of (sample index, frame) and only collated when consumed, so a resumed
    run can jump to its saved position (`iterate(start=...)`) without building the batches it skips.
    With `stage.tokens_per_batch`, each bucket's batch size keeps tokens per batch near that number.
    """

    def __init__(self, samples: list[LatentSample], stage: TrainStageConfig, normalizer: LatentNormalizer,
                 seed: int, patch: int = 2):
        if not samples:
            raise ValueError(f"stage {stage.name!r}: no samples on this worker")
        self.samples = samples
        self.stage = stage
        self.normalizer = normalizer
        self.seed = seed
        self.patch = patch

    def batch_size(self, shape: tuple[int, ...]) -> int:
        if self.stage.tokens_per_batch is None:
            return self.stage.batch_size
        return max(1, self.stage.tokens_per_batch // token_count(shape, self.patch))

    def plan(self, epoch: int) -> list[list[tuple[int, int | None]]]:
        rng = random.Random(self.seed * 100_003 + epoch)
        buckets: dict[tuple, list] = {}
        for i, sample in enumerate(self.samples):
            frame = None
            shape = sample.latent.shape
            if sample.meta["modality"] == "video" and self.stage.video_frames_as_images:
                frame = rng.randrange(shape[1])
                shape = (shape[0], 1, *shape[2:])
            buckets.setdefault(shape, []).append((i, frame))
        plan = []
        for shape in sorted(buckets):
            group = buckets[shape]
            rng.shuffle(group)
            size = self.batch_size(shape)
            plan += [group[i:i + size] for i in range(0, len(group), size)]
        rng.shuffle(plan)
        return plan

    def epoch(self, epoch: int) -> list[Batch]:
        return [self.collate(entry) for entry in self.plan(epoch)]

    def iterate(self, start: int = 0) -> Iterator[Batch]:
        """Batches from overall position `start` on (every epoch has the same number of batches)."""
        per_epoch = len(self.plan(0))
        epoch, offset = divmod(start, per_epoch)
        while True:
            for entry in self.plan(epoch)[offset:]:
                yield self.collate(entry)
            epoch, offset = epoch + 1, 0

    def __iter__(self) -> Iterator[Batch]:
        return self.iterate(0)

    def collate(self, entry: list[tuple[int, int | None]]) -> Batch:
        latents, texts, masks, modalities, captions = [], [], [], [], []
        for i, frame in entry:
            sample = self.samples[i]
            modality = sample.meta["modality"]
            latent = self.normalizer.normalize(sample.latent, modality)
            if frame is not None:
                latent, modality = latent[:, frame:frame + 1], "image"
            latents.append(latent)
            texts.append(sample.text)
            masks.append(sample.text_mask)
            modalities.append(MODALITY_IDS[modality])
            captions.append(sample.caption)
        return Batch(latent=torch.from_numpy(np.stack(latents)).float(),
                     text=torch.from_numpy(np.stack(texts)).float(),
                     text_mask=torch.from_numpy(np.stack(masks)).bool(),
                     modality=torch.tensor(modalities, dtype=torch.long), captions=captions)


class Prefetcher:
    """Collates the next batches in a background thread while the current step runs.

    numpy stacking and torch.from_numpy release the GIL for the copies that matter, so on a worker with a
    spare core the loader's cost leaves the step's critical path. Order is preserved.
    """

    def __init__(self, iterator: Iterator[Batch], depth: int = 2):
        import queue
        import threading

        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._fill, args=(iterator,), daemon=True)
        self._thread.start()

    def _fill(self, iterator: Iterator[Batch]) -> None:
        try:
            for item in iterator:
                self._queue.put(item)
        except BaseException as e:  # surfaced in the consumer, not lost in the thread
            self._queue.put(e)

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Batch:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item
