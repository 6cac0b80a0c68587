"""A training stage's fixed cost on one node: Ray Train's controller polling every 2 s (its default) vs 0.5 s (what
`fit_stage` sets on one node, training.trainer.controller_env), same Ray, same tiny stage, alternating.

    .venv/bin/python bench/fit_overhead.py [--rounds 3] [--workers 2] [--steps 2]

The stage is a few steps of a tiny DiT on 24 latents, so the time measured is nearly all fixed cost: the
controller and worker processes starting, the process group, the first checkpoint, and the wait until the
controller's next poll sees that the workers have finished. Prints one JSON line: each side's median and every
round's time, and the ratio Ray's default / ours.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def write_dataset(root: Path, n: int = 24) -> None:
    """A dataset card, manifest and one shard of random image latents, shaped as the Haar encoder's."""
    from latentforge.datasets import manifest as mf
    from latentforge.datasets.shards import LatentSample, LatentShardWriter, sha256_file

    rng = np.random.default_rng(0)
    rows, stats, name = [], [], "shard-000000-00.tar"
    with LatentShardWriter(root / mf.SHARDS / name) as writer:
        for i in range(n):
            latent = rng.normal(size=(12, 1, 8, 8)).astype(np.float32)
            writer.write_sample(LatentSample(f"s{i:04d}", latent, rng.normal(size=(8, 16)).astype(np.float32),
                                             np.arange(8) < 5, f"caption {i}", {"modality": "image"}))
            rows.append({"id": f"s{i:04d}", "modality": "image", "latent_shape": list(latent.shape),
                         "caption": f"caption {i}", "shard": name, "status": "ok"})
            stats.append(mf.channel_stats(latent))
    mf.write_table(mf.to_table(rows, mf.MANIFEST_SCHEMA), root / mf.MANIFEST)
    card = {"id": "bench", "name": "bench", "num_samples": n,
            "shards": [{"name": name, "sha256": sha256_file(root / mf.SHARDS / name), "count": n}],
            "encoders": {"visual": {"kind": "haar", "channels": 12},
                         "text": {"kind": "minilm", "dim": 16, "max_len": 8}},
            "latent_stats": {"visual": mf.merge_stats(stats)}, "config": {"encoders": {}}}
    (root / mf.CARD).write_text(json.dumps(card))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray")
    args = parser.parse_args()

    import ray

    from latentforge.training.config import PlanConfig
    from latentforge.training.trainer import POLL_ENV, fit_stage

    root = Path(tempfile.mkdtemp(prefix="lf-fit-overhead-"))
    write_dataset(root / "data")
    plan = PlanConfig.model_validate({
        "model": {"preset": "DiT-T", "overrides": {"hidden": 64, "depth": 2, "mixer_depth": 1}},
        "num_workers": args.workers, "max_failures": 0,
        "stages": [{"name": "s", "modalities": ["image"], "steps": args.steps, "batch_size": 4,
                    "tokens_per_batch": 64, "checkpoint_every": args.steps, "log_every": args.steps,
                    "val_fraction": 0.0, "num_samples": 0}]})
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    os.environ.pop(POLL_ENV, None)
    times: dict[str, list[float]] = {"ray_default": [], "ours": []}
    try:
        for r in range(args.rounds):
            sides = ["ray_default", "ours"] if r % 2 == 0 else ["ours", "ray_default"]
            for side in sides:
                if side == "ray_default":  # set by the user: fit_stage then leaves it as it is
                    os.environ[POLL_ENV] = "2.0"
                start = time.perf_counter()
                fit_stage(plan, plan.stages[0], [root / "data"], root / "checkpoints", f"{side}-{r}")
                times[side].append(round(time.perf_counter() - start, 2))
                os.environ.pop(POLL_ENV, None)
    finally:
        ray.shutdown()
    medians = {side: statistics.median(t) for side, t in times.items()}
    print(json.dumps({"rounds": args.rounds, "workers": args.workers, "steps": args.steps,
                      "ray_default_s": medians["ray_default"], "ours_s": medians["ours"],
                      "ratio_default_over_ours": round(medians["ray_default"] / medians["ours"], 3),
                      "each_round": times}))


if __name__ == "__main__":
    main()
