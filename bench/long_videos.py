"""A long video cut into many clips, the code before (baseline) against now, both measured in this run:
(1) its clips' exact and near-duplicate hashes, per clip against per file; (2) decoding its clips one after
another, a fresh decord open per clip against a kept reader.

    .venv/bin/python bench/long_videos.py [--videos 4] [--seconds 60] [--shot-seconds 2] [--size 256] [--noise 8]

Writes `--videos` H.264 files (24 fps, a new shot every `--shot-seconds`, `--noise` grain so the files have a
camera's bitrate rather than a few KB), probes them and cuts them into clips with the project's `ProbeMedia`
and `SplitClips` (one clip per shot), then, one process, `--rounds` alternating rounds, medians:
- hashes: per clip (the code before), `file_sha256(uri, span)` reads and hashes the whole file for each clip,
  and `visual_phash` opens the video for each clip's middle frame; `ContentHash`, in batches of its configured
  size: each file's bytes hashed once (a copy of the digest extended per clip) and the clips' middle frames
  decoded on a kept reader (`video.READERS`). Checks that both give every clip the same `content_sha256`
  and `phash`.
- decodes: `video.decode_clip` of every clip in order (4 frames at 128 px, what the encoders ask for), with the
  kept readers dropped before each clip (`READERS.forget()`: a fresh open, the code before) or kept. Checks
  that both give the same frames.
Reports CPU and wall ms per clip.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def make_videos(root: Path, count: int, seconds: float, shot_seconds: float, size: int, noise: float,
                encode=None) -> None:
    from latentforge.datasets.demo_corpus import COLORS, draw_shape, encode_video

    encode = encode or encode_video
    rng = np.random.default_rng(0)
    fps, per_shot = 24, round(24 * shot_seconds)
    colors = list(COLORS)
    for v in range(count):
        frames = []
        for _ in range(round(seconds / shot_seconds)):
            fg, bg = rng.choice(len(colors), 2, replace=False)
            shape = ("circle", "square")[int(rng.integers(2))]
            start = rng.integers(size // 4, 3 * size // 4, 2)
            frames += [draw_shape(size, shape, colors[fg], colors[bg], (int(start[0]) + k, int(start[1])))
                       for k in range(per_shot)]
        pixels = np.stack(frames)
        if noise:  # sensor-like grain: flat synthetic shapes alone compress to a few KB a minute
            pixels = np.clip(pixels + rng.normal(0, noise, pixels.shape), 0, 255).astype(np.uint8)
        encode(root / f"v{v:02d}.mp4", pixels, fps)


def clips_of(root: Path, shot_seconds: float):
    from latentforge.pipelines.config import CurationConfig
    from latentforge.pipelines.discover import discover
    from latentforge.pipelines.stage import batch_of
    from latentforge.pipelines.stages.probe_media import ProbeMedia
    from latentforge.pipelines.stages.split_clips import ClipSplitConfig, SplitClips

    cfg = CurationConfig(input_dir=root, clips=ClipSplitConfig(enabled=True, min_seconds=shot_seconds / 2,
                                                                max_seconds=shot_seconds))
    rows = discover(root, samples_per_shard=10**6)
    return cfg, SplitClips(cfg)(ProbeMedia(cfg)(batch_of(rows)))


def per_clip(cfg, clips) -> list[tuple[str, str]]:
    from latentforge.datasets import video
    from latentforge.pipelines.stage import rows_of
    from latentforge.pipelines.stages.dedup import clip_span, file_sha256, visual_phash

    out = []
    for r in rows_of(clips):
        video.READERS.forget()  # a fresh open per clip, as before
        out.append((file_sha256(r["uri"], clip_span(r)), visual_phash(r, cfg.dedup.hash_size, cfg.decode_timeout_s)))
    return out


def per_file(cfg, clips) -> list[tuple[str, str]]:
    from latentforge.pipelines.stages.dedup import ContentHash

    stage, n, size = ContentHash(cfg), len(clips["id"]), ContentHash.resources.batch_size
    out = []
    for start in range(0, n, size):
        hashed = stage({k: v[start : start + size] for k, v in clips.items()})
        out += list(zip(hashed["content_sha256"], hashed["phash"]))
    return out


def decode_all(clips, fresh: bool = False) -> list[np.ndarray]:
    from latentforge.datasets import video
    from latentforge.pipelines.stage import rows_of

    out = []
    for row in rows_of(clips):
        if fresh:
            video.READERS.forget()
        out.append(video.decode_clip(row["uri"], row["clip_start_s"], row["clip_end_s"], 4, (128, 128))[0])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--shot-seconds", type=float, default=2.0)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--noise", type=float, default=8.0, help="grain (std of 8-bit levels) on every frame")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_videos(root, args.videos, args.seconds, args.shot_seconds, args.size, args.noise)
        cfg, clips = clips_of(root, args.shot_seconds)
        n = len(clips["id"])
        ways = {"per_clip": per_clip, "per_file": per_file}
        times: dict[str, list[tuple[float, float]]] = {w: [] for w in ways}
        results = {}
        for r in range(args.rounds):
            for way in (("per_clip", "per_file") if r % 2 == 0 else ("per_file", "per_clip")):
                cpu, wall = time.process_time(), time.perf_counter()
                results[way] = ways[way](cfg, clips)
                times[way].append(((time.process_time() - cpu) * 1e3 / n, (time.perf_counter() - wall) * 1e3 / n))
        if results["per_clip"] != results["per_file"] or not all(all(pair) for pair in results["per_file"]):
            raise SystemExit("the two ways gave different (or empty) hashes")
        decodes = {"fresh_open": lambda: decode_all(clips, fresh=True), "kept_reader": lambda: decode_all(clips)}
        for r in range(args.rounds):
            for way in (("fresh_open", "kept_reader") if r % 2 == 0 else ("kept_reader", "fresh_open")):
                cpu, wall = time.process_time(), time.perf_counter()
                results[way] = decodes[way]()
                times[way] = [*times.get(way, []),
                              ((time.process_time() - cpu) * 1e3 / n, (time.perf_counter() - wall) * 1e3 / n)]
        if any(not np.array_equal(a, b) for a, b in zip(results["fresh_open"], results["kept_reader"])):
            raise SystemExit("a kept reader gave other frames than a fresh open")
        mb = sum(p.stat().st_size for p in root.glob("*.mp4")) / args.videos / 2**20
        report = {"videos": args.videos, "seconds": args.seconds, "clips": n, "size": args.size,
                  "noise": args.noise, "file_mb": round(mb, 2)}
        for way, t in times.items():
            report[f"{way}_cpu_ms"] = round(statistics.median(x[0] for x in t), 2)
            report[f"{way}_wall_ms"] = round(statistics.median(x[1] for x in t), 2)
        for name, before, now in (("hash", "per_clip", "per_file"), ("decode", "fresh_open", "kept_reader")):
            report[f"{name}_cpu_ratio"] = round(report[f"{before}_cpu_ms"] / report[f"{now}_cpu_ms"], 2)
            report[f"{name}_wall_ratio"] = round(report[f"{before}_wall_ms"] / report[f"{now}_wall_ms"], 2)
            print(f"{n} clips of {args.videos} videos ({report['file_mb']} MB each), {name}: {before} "
                  f"{report[f'{before}_cpu_ms']} CPU-ms, {now} {report[f'{now}_cpu_ms']} CPU-ms per clip "
                  f"({report[f'{name}_cpu_ratio']}x); wall {report[f'{name}_wall_ratio']}x")
        print(json.dumps(report))


if __name__ == "__main__":
    main()
