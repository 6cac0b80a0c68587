"""Shard loader throughput, and a training step fed by the real loader vs the same step fed from memory.

    .venv/bin/python bench/loader.py [--samples 20000] [--steps 40]

Prints, in one run: samples/s of reading shards (tar + npy decode), samples/s of bucketed batches from the
loader, and the time per training step of a small DiT on 4x32x32 latents (a) fed from one batch kept in
memory and (b) fed by the real loader behind its prefetch thread; ratio = (b) / (a).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def write_shards(root: Path, n: int, per_shard: int = 2000) -> list[Path]:
    from latentforge.datasets.shards import LatentSample, LatentShardWriter

    rng = np.random.default_rng(0)
    text, mask = rng.normal(size=(16, 64)).astype(np.float32), np.arange(16) < 8
    paths = []
    for s in range(0, n, per_shard):
        path = root / f"shard-{s // per_shard:06d}-00.tar"
        with LatentShardWriter(path) as w:
            for i in range(s, min(n, s + per_shard)):
                w.write_sample(LatentSample(f"s{i:07d}", rng.normal(size=(4, 1, 32, 32)).astype(np.float32), text,
                                            mask, "a caption", {"modality": "image"}))
        paths.append(path)
    return paths


def rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    from latentforge.datasets.shards import iter_shards
    from latentforge.training.config import TrainStageConfig
    from latentforge.training.dit import DiT, DiTConfig
    from latentforge.training.flow import flow_loss
    from latentforge.training.loader import BucketedBatches, LatentNormalizer, Prefetcher

    torch.set_num_threads(1)  # one worker process = one core's worth of work on this machine
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_shards(Path(tmp), args.samples)
        t0 = time.perf_counter()
        samples = list(iter_shards(paths))
        read = rate(len(samples), time.perf_counter() - t0)
    stage = TrainStageConfig(name="bench", modalities=["image"], steps=1, batch_size=args.batch)
    norm = LatentNormalizer({"latent_stats": {"visual": {"mean": [0.0] * 4, "std": [1.0] * 4, "count": 1}}})
    batches = BucketedBatches(samples, stage, norm, seed=0)
    it = batches.iterate()
    t0 = time.perf_counter()
    n = sum(next(it).latent.shape[0] for _ in range(len(samples) // args.batch))
    batched = rate(n, time.perf_counter() - t0)

    model = DiT(DiTConfig(hidden=128, depth=4, heads=4, visual_channels=4, text_dim=64, max_text_len=16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(batch) -> None:
        loss = flow_loss(model, batch.latent, batch.text, batch.text_mask, batch.modality,
                         generator=torch.Generator().manual_seed(0))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(feed) -> float:
        for _ in range(3):
            step(next(feed))
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(next(feed))
        return (time.perf_counter() - t0) / args.steps

    fixed = next(batches.iterate())
    memory = timed(iter(lambda: fixed, None))
    loader = timed(Prefetcher(batches.iterate()))
    memory_again = timed(iter(lambda: fixed, None))  # brackets the loader run against drift
    baseline = (memory + memory_again) / 2
    print(json.dumps({"samples": args.samples, "shard_read_samples_per_s": read,
                      "loader_batches_samples_per_s": batched, "step_s_from_memory": round(baseline, 4),
                      "step_s_with_loader": round(loader, 4), "ratio_loader_over_memory": round(loader / baseline, 4)}))


if __name__ == "__main__":
    main()
