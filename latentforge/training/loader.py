"""Latent batches streamed to one worker: the stage's manifest selection, split over ranks and DataLoader
workers, batched per bucket in an order fixed by the seed, resumable mid-epoch.

How a stream is laid out (webdataset-style splitting, done here rather than by Ray Data's streaming_split
because streaming_split hands out blocks in whatever order its executor finishes them, so neither the order
nor a mid-epoch resume position would be reproducible; a rank here re-derives its exact stream from the seed):

- A *reader* is one DataLoader worker of one rank: `readers = world * max(1, loader.workers)`.
- Each epoch the selection's shards are shuffled with (seed, epoch), laid end to end (each in key order) and
  cut into `readers` consecutive runs of equal sample count (within one), so readers are disjoint, together
  cover the selection once per epoch, and take the same share whatever the shards' sizes after `where`
  (every rank takes the same number of steps). A reader reads whole shards but at most one partial shard
  at each end of its run (reading only its own keys of those); with fewer shards than readers, a shard is
  split between several readers.
- A reader streams its share through a shuffle buffer into per-bucket accumulators; a bucket's batch is
  emitted when it holds `batch_size(shape)` samples (epoch ends flush short batches). The buffer and the
  accumulators are all a reader holds, whatever the dataset size.
- The same procedure is first run on manifest metadata alone (ids, shard, latent shape) to *plan* the epoch
  as lists of sample ids. Reading then decodes exactly the planned samples and emits a batch as soon as it
  is complete; a resumed reader plans up to its position and decodes only what later batches need.
"""
from __future__ import annotations

import itertools
import math
import random
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from latentforge.datasets.compat import check_compatible
from latentforge.datasets.manifest import Dataset
from latentforge.datasets.shards import MEMBERS, ShardFormatError
from latentforge.training.batch import Batch, LatentNormalizer  # re-exported
from latentforge.training.batch import Decoded, MemberFormat, check_alike
from latentforge.training.config import MODALITY_IDS, TrainStageConfig
from latentforge.training.entries import Entries, Entry  # noqa: F401  (Entry re-exported for tests)
from latentforge.training.entries import select_entries as entries_of
from latentforge.training.prefetch import Prefetcher
from latentforge.training.shard_reader import NpyDecoder, iter_raw_samples


def as_list(datasets: Dataset | list[Dataset]) -> list[Dataset]:
    return [datasets] if isinstance(datasets, Dataset) else list(datasets)


def open_datasets(datasets: Dataset | list[Dataset]) -> list[Dataset]:
    """The datasets of a stage, refused when their encoders differ or one is listed twice."""
    datasets = as_list(datasets)
    roots = [str(d.root.resolve()) if isinstance(d.root, Path) else str(d.root).rstrip("/") for d in datasets]
    if len(set(roots)) < len(roots):
        raise ValueError(f"dataset {max(roots, key=roots.count)} is listed twice in the stage's datasets: list it once")
    check_compatible([d.card for d in datasets], [str(d.root) for d in datasets])
    return datasets


def select_entries(datasets: Dataset | list[Dataset], stage: TrainStageConfig, split: str = "train") -> Entries:
    """The samples the stage's selection picks (manifest `where`, modalities, train/val split by id hash),
    sorted by (shard, key): the order they lie in the shards (see entries.select_entries)."""
    return entries_of(as_list(datasets), stage.where, list(stage.modalities), stage.val_fraction, split)


def select_samples(datasets: Dataset | list[Dataset], stage: TrainStageConfig,
                   split: str = "train") -> tuple[list[Path], list[tuple]]:
    """Shard paths and (dataset index, sample id) pairs, sorted, that the stage's selection picks."""
    entries = select_entries(datasets, stage, split)
    return sorted({Path(e.shard) for e in entries}), sorted((e.dataset, e.key) for e in entries)


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


def token_count(shape: tuple[int, ...], patch: int) -> int:
    """DiT tokens of one latent (C, T, H, W): visual latents are patchified (1, p, p), audio has H = W = 1."""
    _, t, h, w = shape
    return t if h == w == 1 else t * (h // patch) * (w // patch)


def mix_copies(entries: Entries, mix: dict[str, float], stage: str) -> np.ndarray:
    """Expected copies per epoch of one sample of each modality (by `entries.modalities` index), so that each
    modality's share of the epoch is its share of `mix` and the epoch keeps its size. A modality the selection
    has no sample of is left out with a warning, the others' shares renormalised (as `modalities` naming one
    the data lacks is no error either)."""
    counts = np.bincount(entries.modality_index, minlength=len(entries.modalities))
    absent = sorted(m for m in mix if m not in entries.modalities or not counts[entries.modalities.index(m)])
    if absent:
        warnings.warn(f"stage {stage!r}: mix gives {', '.join(absent)} a share, but the selection has no such "
                      f"samples; the other modalities share the epoch", stacklevel=2)
    total = sum(share for m, share in mix.items() if m not in absent)
    return np.array([mix.get(m, 0.0) / total * len(entries) / max(int(c), 1)
                     for m, c in zip(entries.modalities, counts)])


Item = tuple[int, "int | None"]  # (entry index, frame for video_frames_as_images)


class StreamPlan:
    """Which samples each reader reads in each epoch, and how they batch; see the module docstring."""

    def __init__(self, entries: Entries | list[Entry], stage: TrainStageConfig, normalizer: LatentNormalizer, seed: int,
                 readers: int = 1, patch: int = 2, repa: bool = False, member_format: MemberFormat | None = None,
                 mix: dict[str, float] | None = None):
        if len(entries) < readers:
            raise ValueError(f"stage {stage.name!r} selects {len(entries)} samples, fewer than {readers} readers "
                             f"(workers x loader.workers)")
        self.entries, self.stage, self.normalizer = Entries.of(entries), stage, normalizer
        self.seed, self.readers, self.patch, self.repa = seed, readers, patch, repa
        self.member_format = member_format or MemberFormat()  # text / REPA shapes the dataset cards fix, where they do
        shard = self.entries.shard_index
        starts = [0] + (np.flatnonzero(shard[1:] != shard[:-1]) + 1).tolist()
        self.shards = list(zip(starts, starts[1:] + [len(entries)]))  # entry index range [lo, hi) per shard
        self._plans: dict[tuple[int, int], list[list[Item]]] = {}
        self.peak_held = 0  # most decoded samples held at once (bounded by the buffer, not the share)
        self.copies = None if mix is None else mix_copies(self.entries, mix, stage.name)  # per modality index

    def batch_size(self, shape: tuple[int, ...]) -> int:
        if self.stage.tokens_per_batch is None:
            return self.stage.batch_size
        return max(1, self.stage.tokens_per_batch // token_count(shape, self.patch))

    def prompt_plan(self, per_bucket: int) -> StreamPlan:
        """A one-reader plan over `per_bucket` entries of every bucket (latent shape), taken shard by shard in a
        seeded order until each bucket has them: sample prompts from every bucket while reading few shards (the
        first batches of one reader hold only the buckets its share happens to start with)."""
        order = list(range(len(self.shards)))
        random.Random(f"prompts:{self.seed}").shuffle(order)
        shapes = self.entries.shape_index
        need = {shape: min(per_bucket, n) for shape, n in Counter(shapes.tolist()).items()}
        taken: dict[int, list[int]] = {shape: [] for shape in need}
        for lo, hi in (self.shards[s] for s in order):
            for i, shape in enumerate(shapes[lo:hi].tolist(), start=lo):
                bucket = taken[shape]
                if len(bucket) < need[shape]:
                    bucket.append(i)
            if all(len(taken[shape]) == n for shape, n in need.items()):
                break
        chosen = sorted(i for bucket in taken.values() for i in bucket)
        return StreamPlan(self.entries.take(chosen), self.stage, self.normalizer, self.seed, 1, self.patch,
                          self.repa, self.member_format)

    def share(self, reader: int, epoch: int) -> list[int]:
        """The entries `reader` reads in `epoch`, in order: its run of the shuffled shards (module docstring)."""
        order = list(range(len(self.shards)))
        random.Random(f"units:{self.seed}:{epoch}").shuffle(order)
        n = len(self.entries)
        first, last = reader * n // self.readers, (reader + 1) * n // self.readers
        out, pos = [], 0  # pos: where the next shard starts in the epoch's sequence
        for lo, hi in (self.shards[s] for s in order):
            if pos >= last:
                break
            if pos + hi - lo > first:
                out.extend(range(lo + max(0, first - pos), lo + min(hi - lo, last - pos)))
            pos += hi - lo
        return out

    def plan(self, reader: int, epoch: int) -> list[list[Item]]:
        """The epoch's batches (lists of items) for one reader, from metadata alone."""
        if (reader, epoch) in self._plans:
            return self._plans[(reader, epoch)]
        rng = random.Random(f"plan:{self.seed}:{reader}:{epoch}")
        size = self.stage.loader.shuffle_buffer
        buffer: list[Item] = []
        accumulators: dict[tuple, list[Item]] = {}
        plan: list[list[Item]] = []

        def add(item: Item) -> None:
            shape = self.item_shape(item)
            group = accumulators.setdefault(shape, [])
            group.append(item)
            if len(group) == self.batch_size(shape):
                plan.append(accumulators.pop(shape))

        entries = self.entries
        frames_of = self.stage.video_frames_as_images and "video" in entries.modalities
        video = entries.modalities.index("video") if frames_of else -1
        for i in self.share(reader, epoch):
            copies = 1
            if self.copies is not None:  # stage.mix: a whole number of copies, and one more with the fraction's odds
                expected = self.copies[entries.modality_index[i]]
                copies = int(expected) + (rng.random() < expected - int(expected))
            for _ in range(copies):
                frame = None
                if entries.modality_index[i] == video:
                    frame = rng.randrange(entries.shape(i)[1])
                if len(buffer) < size:
                    buffer.append((i, frame))
                    continue
                slot = rng.randrange(size)
                add(buffer[slot])
                buffer[slot] = (i, frame)
        rng.shuffle(buffer)
        for item in buffer:
            add(item)
        plan += [accumulators[shape] for shape in sorted(accumulators)]
        self._plans = {(reader, epoch): plan}  # keep one: a reader plans epoch after epoch
        return plan

    def item_shape(self, item: Item) -> tuple[int, ...]:
        shape = self.entries.shape(item[0])
        return shape if item[1] is None else (shape[0], 1, *shape[2:])

    def batches(self, reader: int, start: int = 0) -> Iterator[Batch]:
        """The reader's endless batches from its own position `start` on."""
        epoch = 0
        while start >= len(self.plan(reader, epoch)):  # metadata only: nothing is read for skipped batches
            start -= len(self.plan(reader, epoch))
            epoch += 1  # ends: every reader gets a non-empty share every epoch
        while True:
            yield from self.read_epoch(reader, epoch, start)
            epoch, start = epoch + 1, 0

    def read_epoch(self, reader: int, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Decode exactly the samples of batches [start:] of the plan and emit each batch once complete."""
        plan = self.plan(reader, epoch)
        batches_of: dict[int, list[int]] = {}  # an entry is in several batches where stage.mix repeats it
        for b in range(start, len(plan)):
            for i, _ in plan[b]:
                batches_of.setdefault(i, []).append(b)
        uses = {i: len(b) for i, b in batches_of.items()}  # collate drops a decoded sample after its last use
        missing = [len(batch) for batch in plan]
        decoded: dict[int, Decoded] = {}
        decode = NpyDecoder()
        cursor = start
        needed = [i for i in self.share(reader, epoch) if i in batches_of]
        for uri, group in itertools.groupby(needed, key=self.entries.shard):
            wanted = {self.entries.key(i): i for i in group}
            for key, members in iter_raw_samples(uri, wanted_key=wanted.__contains__):
                i = wanted.pop(key, None)
                if i is None:
                    continue
                decoded[i] = self.decode(members, decode, uri, key, self.entries.shape(i))
                self.peak_held = max(self.peak_held, len(decoded))
                for b in batches_of[i]:
                    missing[b] -= 1
                while cursor < len(plan) and missing[cursor] == 0:
                    yield self.collate(plan[cursor], decoded, uses)
                    cursor += 1
            if wanted:
                raise ShardFormatError(f"{uri}: samples named by the manifest are missing: {sorted(wanted)[:5]}")
        if cursor != len(plan):
            raise RuntimeError(f"reader {reader} epoch {epoch}: batch {cursor} of {len(plan)} never completed")

    def decode(self, members: dict, decode: NpyDecoder, uri: str, key: str, shape: tuple[int, ...]) -> Decoded:
        missing = [m for m in MEMBERS if m not in members]
        if missing:
            raise ShardFormatError(f"{uri}: sample {key}: missing members {missing}")
        repa = members.get("repa.npy")
        if self.repa and repa is None:
            raise ShardFormatError(f"{uri}: sample {key} has no repa.npy, but the stage trains with REPA")
        try:
            out = Decoded(decode(members["latent.npy"], f"{uri}:{key}.latent.npy"),
                          decode(members["text.npy"], f"{uri}:{key}.text.npy"),
                          decode(members["text_mask.npy"], f"{uri}:{key}.text_mask.npy"),
                          str(members["caption.txt"], "utf-8"),
                          decode(repa, f"{uri}:{key}.repa.npy") if self.repa else None)
        except UnicodeDecodeError as e:
            raise ShardFormatError(f"{uri}: sample {key}: caption is not UTF-8: {e}") from e
        if out.latent.shape != shape or out.latent.dtype.kind != "f":  # here, not after collate's np.stack
            raise ShardFormatError(f"{uri}: sample {key}: latent {out.latent.dtype} {out.latent.shape}, but the "
                                   f"manifest says shape {shape}")
        self.member_format.check(out, f"{uri}: sample {key}")  # text, text_mask, repa: the cards' shapes, float
        return out

    def collate(self, items: list[Item], decoded: dict[int, Decoded], uses: dict[int, int]) -> Batch:
        """The batch of `items`; a decoded sample is dropped after its last use (`uses`: the uses left)."""
        samples = [decoded[i] for i, _ in items]
        for i, _ in items:
            uses[i] -= 1
            if not uses[i]:
                del decoded[i]
        check_alike(samples, lambda n: f"{self.entries.shard(items[n][0])}: sample {self.entries.key(items[n][0])}")
        names, kinds = self.entries.modalities, self.entries.modality_index
        modalities = ["image" if frame is not None else names[kinds[i]] for i, frame in items]
        latent = np.stack([s.latent if f is None else s.latent[:, f:f + 1] for s, (_, f) in zip(samples, items)])
        families = {LatentNormalizer.family(m) for m in modalities}
        if len(families) > 1:
            raise ValueError(f"a batch of shape {latent.shape} mixes latent families {sorted(families)}")
        latent = self.normalizer.normalize(latent, modalities[0])  # (C, 1, 1, 1) statistics broadcast over B
        repa = torch.from_numpy(np.stack([s.repa for s in samples])) if self.repa else None
        return Batch(latent=torch.from_numpy(np.ascontiguousarray(latent, dtype=np.float32)),
                     text=torch.from_numpy(np.stack([s.text for s in samples]).astype(np.float32, copy=False)),
                     text_mask=torch.from_numpy(np.stack([s.text_mask for s in samples]).astype(bool, copy=False)),
                     modality=torch.tensor([MODALITY_IDS[m] for m in modalities], dtype=torch.long),
                     captions=[s.caption for s in samples], repa=repa)


class LatentStream(torch.utils.data.IterableDataset):
    """One rank's stream; each DataLoader worker process is one reader of the plan.

    torch's DataLoader takes batches from its workers round robin, so rank batch i comes from worker slot
    i % W. A stream resumed at `start` rotates the slots so that slot 0 plays the reader that owns batch
    `start`, and each reader skips the batches it had already given.
    """

    def __init__(self, plan: StreamPlan, rank: int, workers: int, start: int = 0):
        self.plan, self.rank, self.workers, self.start = plan, rank, max(1, workers), start

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        slot = info.id if info is not None else 0
        logical = (slot + self.start) % self.workers
        done = max(0, math.ceil((self.start - logical) / self.workers))
        return self.plan.batches(self.rank * self.workers + logical, done)


def build_stream(plan: StreamPlan, rank: int, start: int = 0) -> Iterator[Batch]:
    """Endless batches of `rank` from overall position `start`: decoded in `loader.workers` processes, or
    (0) in a prefetch thread of this process."""
    workers = plan.stage.loader.workers
    if plan.readers % max(1, workers):
        raise ValueError(f"plan has {plan.readers} readers, not a multiple of loader.workers={workers}")
    dataset = LatentStream(plan, rank, workers, start)
    if workers == 0:
        return Prefetcher(iter(dataset))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                         prefetch_factor=plan.stage.loader.prefetch,
                                         pin_memory=torch.cuda.is_available())
    return iter(loader)


def rank_plan(datasets: Dataset | list[Dataset], stage: TrainStageConfig, normalizer: LatentNormalizer,
              seed: int, world: int, patch: int = 2, repa: bool = False) -> StreamPlan:
    """The stage's training plan for `world` ranks (the same object on every rank)."""
    datasets = open_datasets(datasets)
    return StreamPlan(select_entries(datasets, stage), stage, normalizer, seed,
                      readers=world * max(1, stage.loader.workers), patch=patch, repa=repa,
                      member_format=MemberFormat.of([d.card for d in datasets]), mix=stage.mix)


def load_batches(datasets: Dataset | list[Dataset], stage: TrainStageConfig, normalizer: LatentNormalizer,
                 seed: int = 0, split: str = "train", limit: int | None = None, patch: int = 2,
                 repa: bool = False) -> list[Batch]:
    """One epoch of one reader over (the first `limit` of) a selection, in this process: validation sets,
    sampling prompts, tests."""
    datasets = open_datasets(datasets)
    entries = select_entries(datasets, stage, split)
    if limit is not None:  # the first `limit` by (dataset, key), then back in (shard, key) order
        entries = entries.take(np.sort(np.lexsort((entries.keys, entries.dataset))[:limit]))
    if not entries:
        return []
    member_format = MemberFormat.of([d.card for d in datasets])
    return list(StreamPlan(entries, stage, normalizer, seed, 1, patch, repa, member_format).read_epoch(0, 0))


def repa_feature_dim(datasets: Dataset | list[Dataset], stage: TrainStageConfig) -> int:
    """Width D of the datasets' REPA features (card `encoders.repa`), refused when a dataset has none or they
    differ: a stage with `repa` needs repa.npy in every sample it reads."""
    dims = {}
    for dataset in as_list(datasets):
        repa = dataset.card.get("encoders", {}).get("repa")
        if not repa or not repa.get("dim"):
            raise ValueError(f"stage {stage.name!r} sets `repa`, but dataset {dataset.root} has no REPA features "
                             f"(its card has no encoders.repa); curate it with REPA features or remove the stage's "
                             f"`repa` key")
        dims[str(dataset.root)] = (repa.get("kind"), repa.get("model"), int(repa["dim"]))
    if len(set(dims.values())) > 1:
        raise ValueError(f"stage {stage.name!r}: datasets carry different REPA features: {dims}")
    return next(iter(dims.values()))[2]
