"""Shard loader throughput, and a training step fed by the real loader vs the same step fed from memory.

    .venv/bin/python bench/loader.py [--samples 20000] [--steps 40] [--workers 1]

Prints, in one run: samples/s of the previous read path (webdataset tar expansion + np.load per member, the
baseline), samples/s of the streaming loader in one process (lean tar reader, cached npy headers, shuffle
buffer, per-bucket batches: the per-worker-process figure), samples/s of the stream behind `--workers`
DataLoader processes, and the time per training step of a small DiT on 4x32x32 latents (a) fed from one
batch kept in memory and (b) fed by the real loader (`build_stream`); ratio = (b) / (a).
"""
from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def write_dataset(root: Path, n: int, per_shard: int = 2000) -> list[Path]:
    from latentforge.datasets import manifest as mf
    from latentforge.datasets.shards import LatentSample, LatentShardWriter

    rng = np.random.default_rng(0)
    text, mask = rng.normal(size=(16, 64)).astype(np.float32), np.arange(16) < 8
    paths, rows = [], []
    for s in range(0, n, per_shard):
        name = f"shard-{s // per_shard:06d}-00.tar"
        with LatentShardWriter(root / mf.SHARDS / name) as w:
            for i in range(s, min(n, s + per_shard)):
                w.write_sample(LatentSample(f"s{i:07d}", rng.normal(size=(4, 1, 32, 32)).astype(np.float32), text,
                                            mask, "a caption", {"modality": "image"}))
                rows.append({"id": f"s{i:07d}", "modality": "image", "latent_shape": [4, 1, 32, 32], "shard": name,
                             "status": "ok"})
        paths.append(root / mf.SHARDS / name)
    mf.write_table(mf.to_table(rows, mf.MANIFEST_SCHEMA), root / mf.MANIFEST)
    stats = {"visual": {"mean": [0.0] * 4, "std": [1.0] * 4, "count": 1}}
    (root / mf.CARD).write_text(json.dumps({"latent_stats": stats, "encoders": {}}))
    return paths


def rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader processes feeding the step")
    args = parser.parse_args()

    from latentforge.datasets.manifest import Dataset
    from latentforge.datasets.shards import iter_shards
    from latentforge.training.config import TrainStageConfig
    from latentforge.training.dit import DiT, DiTConfig
    from latentforge.training.flow import flow_loss
    from latentforge.training.loader import LatentNormalizer, build_stream, rank_plan

    torch.set_num_threads(1)  # one worker process = one core's worth of work on this machine
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    paths = write_dataset(root, args.samples)
    dataset = Dataset(root)
    norm = LatentNormalizer(dataset.card)

    def stage(workers: int) -> TrainStageConfig:
        return TrainStageConfig(name="bench", modalities=["image"], steps=1, batch_size=args.batch,
                                loader={"workers": workers})

    t0 = time.perf_counter()
    baseline_read = rate(sum(1 for _ in iter_shards(paths)), time.perf_counter() - t0)
    plan = rank_plan(dataset, stage(0), norm, seed=0, world=1)
    t0 = time.perf_counter()
    streamed = rate(sum(b.latent.shape[0] for b in plan.read_epoch(0, 0)), time.perf_counter() - t0)
    stream = build_stream(rank_plan(dataset, stage(max(1, args.workers)), norm, seed=0, world=1), 0)
    next(stream)  # worker start-up is not throughput
    t0 = time.perf_counter()
    n = sum(b.latent.shape[0] for b in itertools.islice(stream, args.samples // args.batch // 2))
    via_workers = rate(n, time.perf_counter() - t0)

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

    fixed = next(plan.read_epoch(0, 0))
    memory = timed(iter(lambda: fixed, None))
    loader = timed(build_stream(rank_plan(dataset, stage(args.workers), norm, seed=1, world=1), 0))
    memory_again = timed(iter(lambda: fixed, None))  # brackets the loader run against drift
    baseline = (memory + memory_again) / 2
    print(json.dumps({"samples": args.samples, "workers": args.workers,
                      "baseline_webdataset_read_samples_per_s": baseline_read,
                      "stream_one_process_samples_per_s": streamed,
                      "ratio_stream_over_webdataset": round(streamed / baseline_read, 2),
                      f"stream_{max(1, args.workers)}_workers_samples_per_s": via_workers,
                      "step_s_from_memory": round(baseline, 4), "step_s_with_loader": round(loader, 4),
                      "ratio_loader_over_memory": round(loader / baseline, 4)}))
    tmp.cleanup()


if __name__ == "__main__":
    main()
