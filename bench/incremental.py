"""Incremental curation: a grown corpus curated again on its existing dataset vs from scratch, in the same run.

    .venv/bin/python bench/incremental.py [--images 480 --videos 240 --audio 240] [--add 10] [--rounds 3] \
        [media options as bench/curation.py] [--corpus DIR]

The corpus (bench/curation.py's: demo images, videos, audio and broken files, every score on) is curated once,
untimed. Then `--add` new pictures are added whose names sort before every other input, so discovery's
index-cut groups would all shift by that many. Timed, each round on a fresh local Ray with the order alternating:

- incremental: `run_curation` on a copy of the first dataset (the finished groups keep their inputs and tars;
  the new pictures go to a new group). The copy is made before the timer starts.
- from scratch (baseline): `run_curation` of the grown corpus into an empty directory, which is what a rerun
  did before, when a file that sorts first shifted every group and each finished group was redone.

Checks that both datasets keep the same samples and account for every input, and counts the tars the
incremental run wrote again (mtime changed; expected 0). Prints medians, the ratio scratch / incremental,
and each round's phase times; and, on the first dataset, what checking the finished groups' tars costs by size
(`curation.resume_check: size`, the default) against sha256 (time_checks).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from curation import demo_corpus, make_aesthetic_models, make_config  # noqa: E402 (bench/curation.py, beside this file)


def add_pictures(corpus: Path, count: int) -> list[str]:
    """`count` new noisy-gradient PNGs named to sort first (`0_added_NNN.png`), each with a caption."""
    import numpy as np
    from PIL import Image

    names = []
    for i in range(count):
        rng = np.random.default_rng(1000 + i)
        base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((256, 192), Image.BICUBIC)
        grain = np.asarray(base).astype(np.int16) + rng.integers(-30, 30, (192, 256, 3))
        name = f"0_added_{i:03d}.png"
        Image.fromarray(np.clip(grain, 0, 255).astype(np.uint8)).save(corpus / name)
        (corpus / name).with_suffix(".txt").write_text(f"an added picture number {i}")
        names.append(name)
    return names


def timed(cfg, out: Path) -> tuple[float, dict]:
    from latentforge.pipelines.curate import run_curation

    start = time.perf_counter()
    result = run_curation(cfg, out)
    return time.perf_counter() - start, {"phases_s": {k: round(v, 1) for k, v in result.seconds.items()},
                                         "kept": result.kept, "inputs": result.inputs}


def accounted(root: Path) -> tuple[list[str], list[str]]:
    from latentforge.datasets import manifest as mf

    ds = mf.Dataset(root)
    kept = sorted(r["id"] for r in ds.manifest().to_pylist())
    return kept, sorted(r["source_id"] for r in ds.manifest().to_pylist() + ds.rejects().to_pylist())


def time_checks(cfg, shard_dir: Path, repeats: int = 3) -> dict:
    """What a rerun spends checking the finished groups' tars before it keeps them (resume.done_groups), by
    size from one listing (the default) and by sha256 (every tar read back; here from a warm page cache on
    local disk, so a floor: on s3 every byte is downloaded). Medians of `repeats`."""
    from latentforge.pipelines.curate import config_hash
    from latentforge.pipelines.resume import done_groups

    out = {"dataset_mb": round(sum(p.stat().st_size for p in shard_dir.glob("*.tar")) / 2**20, 1)}
    for check in ("size", "sha256"):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            groups = done_groups(shard_dir, config_hash(cfg), check)
            times.append(time.perf_counter() - start)
        out[f"{check}_s"], out["groups"] = round(statistics.median(times), 3), len(groups)
    out["ratio_sha256_over_size"] = round(out["sha256_s"] / out["size_s"], 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--videos", type=int, default=240)
    parser.add_argument("--audio", type=int, default=240)
    parser.add_argument("--add", type=int, default=10, help="pictures added before the rerun (names sort first)")
    parser.add_argument("--per-shard", type=int, default=64, help="samples per shard group")
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray (quickstart: 4 on 2 cores)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--corpus", type=Path, help="keep the generated base corpus here (reused when it matches)")
    media = parser.add_argument_group("media sizes (as bench/curation.py)")
    media.add_argument("--media-size", type=int, default=256)
    media.add_argument("--video-frames", type=int, default=48)
    media.add_argument("--video-fps", type=int, default=24)
    media.add_argument("--audio-seconds", type=float, default=4.0)
    media.add_argument("--bucket-size", type=int, default=128)
    media.add_argument("--bucket-frames", type=int, default=8)
    args = parser.parse_args()
    args.split_clips, args.pool, args.no_fusion, args.shard_writes = False, None, False, "auto"  # make_config's

    import ray
    from ray.data import DataContext

    from latentforge.datasets import manifest as mf
    from latentforge.pipelines.curate import run_curation

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = demo_corpus(args.corpus or tmp / "base", args)
        corpus = tmp / "corpus"  # the bench adds files to its own copy, never to a kept corpus
        shutil.copytree(base, corpus, symlinks=True)
        cfg = make_config(corpus, make_aesthetic_models(tmp), args)

        ray.init(address="local", num_cpus=args.cpus, object_store_memory=1024 * 2**20, include_dashboard=False,
                 log_to_driver=False)
        DataContext.get_current().enable_progress_bars = False
        try:
            first = run_curation(cfg, tmp / "first")
        finally:
            ray.shutdown()
        checks = time_checks(cfg, tmp / "first" / mf.SHARDS)
        add_pictures(corpus, args.add)
        rounds = []
        for r in range(args.rounds):
            order = ["incremental", "scratch"] if r % 2 == 0 else ["scratch", "incremental"]
            shutil.copytree(tmp / "first", tmp / f"inc{r}")
            tars = {p.name: p.stat().st_mtime_ns for p in (tmp / f"inc{r}" / mf.SHARDS).glob("*.tar")}
            ray.init(address="local", num_cpus=args.cpus, object_store_memory=1024 * 2**20, include_dashboard=False,
                     log_to_driver=False)
            DataContext.get_current().enable_progress_bars = False
            runs = {}
            try:
                for side in order:
                    runs[side] = timed(cfg, tmp / (f"inc{r}" if side == "incremental" else f"scratch{r}"))
            finally:
                ray.shutdown()
            kept_inc, all_inc = accounted(tmp / f"inc{r}")
            kept_new, all_new = accounted(tmp / f"scratch{r}")
            assert all_inc == all_new and kept_inc == kept_new, "the two datasets differ"
            rewritten = sum((tmp / f"inc{r}" / mf.SHARDS / n).stat().st_mtime_ns != t
                            for n, t in tars.items() if (tmp / f"inc{r}" / mf.SHARDS / n).exists())
            runs["rewritten_tars"] = rewritten
            rounds.append(runs)
            shutil.rmtree(tmp / f"scratch{r}")

    inc = statistics.median(r["incremental"][0] for r in rounds)
    scratch = statistics.median(r["scratch"][0] for r in rounds)
    ratios = [r["scratch"][0] / r["incremental"][0] for r in rounds]
    print(json.dumps({
        "inputs_before": first.inputs, "added": args.add, "inputs_after": rounds[0]["scratch"][1]["inputs"],
        "rounds": args.rounds, "incremental_s": round(inc, 2), "scratch_s": round(scratch, 2),
        "ratio_scratch_over_incremental": round(statistics.median(ratios), 2),
        "ratio_range": [round(min(ratios), 2), round(max(ratios), 2)],
        "rewritten_tars": [r["rewritten_tars"] for r in rounds], "resume_check": checks,
        "per_round": [{side: {"s": round(r[side][0], 1), **r[side][1]} for side in ("incremental", "scratch")}
                      for r in rounds]}, indent=1))


if __name__ == "__main__":
    main()
