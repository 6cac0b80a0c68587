"""Curation throughput: the real Ray Data job vs a single-process loop calling the same stages, same inputs.

    .venv/bin/python bench/curation.py [--images 96] [--videos 48] [--audio 48] [--cpus 4]

Both sides get a demo corpus (images, videos, audio, broken files), the embedded Haar / DCT encoders and the
packaged MiniLM text encoder, every score on: sharpness, motion, text area, audio quality, aesthetic (a CLIP
vision tower with random weights, ViT-B/32-shaped but narrower, and a LAION-shaped head, saved to a temp dir
and loaded by from_pretrained), and NSFW when the `nsfw` extra is installed.

- pipeline: `latentforge.pipelines.curate.run_curation` on a local Ray (`--cpus` logical CPUs), timed from the
  call to the written dataset: actor start-up and model loads are inside the window, the Ray start is not.
- loop: the same Stage classes constructed once and called in one Python process, batch by batch (each stage's
  declared batch size), the driver's global dedup between the halves, the same shard writer, readmission and
  dataset writer.
  Its process is warm (torch and transformers already imported), which favours the loop. Its native libraries
  (decoders, torch, OpenCV, onnxruntime) use their default threads (one per core) unless `--loop-threads` says
  otherwise; each pipeline worker gets its CPU share (1 thread).

Prints samples/s and video-seconds/s for both, the ratio pipeline / loop, and on stderr how many cores the
machine kept busy during each side (from /proc/stat: every process, Ray's included). The ceiling of the ratio
on a machine of C cores is C / (the loop's busy cores).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import unittest.mock
from pathlib import Path

from latentforge.pipelines.stage import batch_of, rows_of


def make_aesthetic_models(root: Path) -> tuple[str, str]:
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from latentforge.pipelines.stages.score_aesthetic import build_head, save_head

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                              image_size=224, patch_size=32, projection_dim=512)
    CLIPVisionModelWithProjection(config).save_pretrained(str(root / "clip"))
    CLIPImageProcessor().save_pretrained(str(root / "clip"))  # CLIP's defaults: resize 224, crop 224
    head = {"input_dim": 512}
    save_head(build_head(head), head, root / "head")
    return str(root / "clip"), str(root / "head")


def demo_corpus(corpus: Path, args) -> Path:
    """The demo corpus of `args`' sizes at `corpus`, generated unless the one there was made with the same spec
    (recorded beside it, not in it: not an input of the job)."""
    from latentforge.datasets.demo_corpus import DemoCorpusSpec, generate_demo_corpus

    spec = DemoCorpusSpec(num_images=args.images, num_videos=args.videos, num_audio=args.audio,
                          image_size=args.media_size, video_frames=args.video_frames, video_fps=args.video_fps,
                          audio_seconds=args.audio_seconds)
    stamp = corpus.parent / f"{corpus.name}.spec.json"
    if not (stamp.exists() and json.loads(stamp.read_text()) == dataclasses.asdict(spec)):
        shutil.rmtree(corpus, ignore_errors=True)
        generate_demo_corpus(corpus, spec)
        stamp.write_text(json.dumps(dataclasses.asdict(spec)))
    return corpus


def make_config(corpus: Path, models: tuple[str, str], args):
    from latentforge.pipelines.config import CurationConfig
    from latentforge.pipelines.stages.score_nsfw import extra_installed

    return CurationConfig.model_validate({
        "name": "bench", "input_dir": str(corpus), "samples_per_shard": args.per_shard,
        "aesthetic": {"enabled": True, "clip_model": models[0], "head": models[1]},
        "nsfw": {"enabled": extra_installed()},
        "clips": {"enabled": args.split_clips}, "fusion": {"pool": args.pool, "enabled": not args.no_fusion},
        "shard_writes": args.shard_writes,
        "image_size": args.bucket_size, "video_frames": args.bucket_frames,
    })


def run_stages(stages, batches: list[dict], cfg, cpu: dict[str, float] | None = None) -> list[dict]:
    """Each stage over all rows in its declared batches, one stage after the other; `cpu` gets each stage's
    process CPU seconds (construction included), as the job reports its stages'."""
    from latentforge.pipelines.curate import active_stages
    from latentforge.pipelines.stage import stage_resources

    # A stage whose `enabled(cfg)` says no is not in the job, so not in the loop either.
    for stage_cls in active_stages(stages, cfg):
        start = time.process_time()
        stage, size = stage_cls(cfg), stage_resources(stage_cls, cfg).batch_size
        rows = [r for b in batches for r in rows_of(b)]
        batches = [stage(batch_of(rows[i:i + size])) for i in range(0, len(rows), size)]
        if cpu is not None:
            cpu[stage_cls.name] = time.process_time() - start
    return batches


def loop(cfg, out: Path) -> tuple[float, int, float]:
    """The job's work in one process, no Ray. Returns (seconds, samples, video seconds)."""
    from latentforge.pipelines import curate
    from latentforge.pipelines.discover import discover
    from latentforge.pipelines.readmit import readmit
    from latentforge.pipelines.duplicates import Marks, duplicates, hash_table, mark
    from latentforge.pipelines.stages.write_shards import write_shard_group

    start, cpu, busy = time.perf_counter(), time.process_time(), busy_cores()
    inputs = discover(cfg.input_dir, cfg.samples_per_shard)
    spent: dict[str, float] = {}
    scanned = [r for b in run_stages(curate.SCAN_STAGES, [batch_of(inputs)], cfg, spent) for r in rows_of(b)]
    hashes = hash_table(scanned)
    marked = mark(batch_of(scanned), Marks.of(hashes, duplicates(hashes, cfg.dedup)))
    (out / "shards").mkdir(parents=True)

    def stages_and_shards(batch: dict, cpu: dict[str, float] | None = None) -> list[dict]:
        rows, meta = [r for b in run_stages(curate.STAGES, [batch], cfg, cpu) for r in rows_of(b)], []
        for group in sorted({int(r["shard"]) for r in rows}):
            part = batch_of([r for r in rows if int(r["shard"]) == group])
            meta += rows_of(write_shard_group(part, str(out / "shards"), int(cfg.max_shard_mb * 2**20),
                                            curate.config_hash(cfg)))
        return meta

    meta = stages_and_shards(marked, spent)
    # as the job does after its stages: duplicates of representatives they filtered go through them again
    meta, _ = readmit(meta, cfg.dedup, {s.name for s in curate.STAGES}, int(inputs[-1]["shard"]) + 1,
                      cfg.samples_per_shard, {}, lambda todo: stages_and_shards(batch_of(todo)), lambda *_: None)
    result = curate.write_dataset(meta, inputs, cfg, out)
    elapsed = time.perf_counter() - start
    print(f"loop: CPU {time.process_time() - cpu:.1f} s in {elapsed:.1f} s, machine "
          f"{machine_busy(busy, os.cpu_count()):.2f} cores busy on average", file=sys.stderr)
    print("loop: CPU s per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in spent.items()), file=sys.stderr)
    video_s = sum(float(r["duration_s"]) for r in scanned if r["modality"] == "video" and r["status"] == "ok")
    return elapsed, result.samples, video_s


def busy_cores() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine from /proc/stat: every process, Ray's included."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def machine_busy(before: tuple[float, float], cores: int) -> float:
    """Average busy cores since `before`."""
    busy, total = busy_cores()
    return cores * (busy - before[0]) / max(total - before[1], 1.0)


def pipeline(cfg, out: Path) -> tuple[float, int]:
    from latentforge.pipelines.curate import run_curation

    start, cpu, busy = time.perf_counter(), time.process_time(), busy_cores()
    result = run_curation(cfg, out)
    print(f"pipeline: driver CPU {time.process_time() - cpu:.1f} s, machine {machine_busy(busy, os.cpu_count()):.2f} "
          f"cores busy on average; phases (wall s): "
          + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()), file=sys.stderr)
    print("pipeline: CPU s per stage, all workers: "
          + ", ".join(f"{k} {v['cpu_s']:.1f}" for k, v in result.stage_seconds.items()), file=sys.stderr)
    return time.perf_counter() - start, result.samples


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """Set environment variables for the block; `limit_threads` then holds the loaded libraries to them."""
    import cv2  # noqa: F401 (imported first, so limit_threads reaches it)
    import torch  # noqa: F401

    from latentforge.pipelines.stage import limit_threads

    with unittest.mock.patch.dict(os.environ, values):  # the stdlib's set-and-restore of a dict, not a mock
        limit_threads()
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--videos", type=int, default=48)
    parser.add_argument("--audio", type=int, default=48)
    parser.add_argument("--per-shard", type=int, default=64, help="samples per shard group")
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray (quickstart: 4 on 2 cores)")
    parser.add_argument("--split-clips", action="store_true", help="also split videos into clips")
    parser.add_argument("--order", choices=["loop-first", "pipeline-first"], default="loop-first")
    parser.add_argument("--pool", type=int, default=None, help="actors of the fused CPU chain (default: fill the CPUs)")
    parser.add_argument("--no-fusion", action="store_true", help="one Ray Data map per stage, as declared")
    parser.add_argument("--shard-writes", choices=["auto", "workers", "driver"], default="auto",
                        help="who writes the pipeline's shard tars (curation.shard_writes; auto: the driver "
                             "here, a local path)")
    parser.add_argument("--loop-threads", type=int, default=0, help=(
        "threads of the decoders, torch, OpenCV and onnxruntime in the loop (0: the libraries' defaults, one per "
        "core); each pipeline worker gets its CPU share, i.e. 1"))
    parser.add_argument("--also-serial-loop", action="store_true",
                        help="also time the loop with one thread per library (as each pipeline worker), same run")
    parser.add_argument("--only", choices=["loop", "pipeline"], help="run one side (for profiling; no ratio)")
    parser.add_argument("--rounds", type=int, default=1, help=(
        "rounds of both sides, each on a fresh local Ray, the order alternating; prints medians and the ratio's "
        "range (one run of either side moves by 5-15%% on a 2-core machine)"))
    parser.add_argument("--corpus", type=Path, help=(
        "keep the generated corpus in this directory and reuse it when it is already there (repeated runs on "
        "the same files; the media options must match the ones it was generated with)"))
    media = parser.add_argument_group("media sizes (the demo corpus's defaults are tiny: per-sample work then "
                                      "vanishes beside fixed costs)")
    media.add_argument("--media-size", type=int, default=64, help="side of generated images and video frames")
    media.add_argument("--video-frames", type=int, default=16)
    media.add_argument("--video-fps", type=int, default=8)
    media.add_argument("--audio-seconds", type=float, default=1.0)
    media.add_argument("--bucket-size", type=int, default=32, help="curation image_size (the latent bucket side)")
    media.add_argument("--bucket-frames", type=int, default=4, help="curation video_frames (frames per clip)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = demo_corpus(args.corpus or tmp / "corpus", args)
        cfg = make_config(corpus, make_aesthetic_models(tmp), args)
        threads = {}
        if args.loop_threads:  # as a pipeline worker: decoders, torch, OpenCV and onnxruntime held to this many
            threads = {"OMP_NUM_THREADS": str(args.loop_threads)}
        sides = ["loop", "pipeline"] if args.order == "loop-first" else ["pipeline", "loop"]
        rounds = []
        for r in range(args.rounds):
            # Every round on a fresh local Ray (no worker warmed by the round before), the sides' order
            # alternating, so drift in the machine's speed and order effects hit both sides alike.
            order = sides if r % 2 == 0 else sides[::-1]
            rounds.append(one_round(cfg, args, tmp / f"round{r}", [args.only] if args.only else order, threads))
    if args.only:
        print(json.dumps({args.only: rounds[0][args.only]} if args.rounds == 1 else
                         {args.only: [runs[args.only] for runs in rounds]}))
        return
    samples, video_s = rounds[0]["loop"][1], rounds[0]["loop"][2]
    for runs in rounds:
        assert runs["pipeline"][1] == runs["loop"][1] == samples, (runs, samples)
    loop_s = statistics.median(runs["loop"][0] for runs in rounds)
    pipe_s = statistics.median(runs["pipeline"][0] for runs in rounds)
    ratios = [runs["loop"][0] / runs["pipeline"][0] for runs in rounds]
    serial = [runs["loop_serial"][0] for runs in rounds if "loop_serial" in runs]
    print(json.dumps({
        "inputs": {"images": args.images, "videos": args.videos, "audio": args.audio}, "samples": samples,
        "media": {"size": args.media_size, "video_frames": args.video_frames, "fps": args.video_fps,
                  "audio_s": args.audio_seconds}, "loop_threads": args.loop_threads or "library defaults",
        "fusion": not args.no_fusion, "shard_writes": args.shard_writes,
        "video_seconds": round(video_s, 2), "ray_cpus": args.cpus, "nsfw": cfg.nsfw.enabled,
        "rounds": args.rounds, "loop_s": round(loop_s, 2), "pipeline_s": round(pipe_s, 2),
        "loop_samples_per_s": round(samples / loop_s, 2), "pipeline_samples_per_s": round(samples / pipe_s, 2),
        "loop_video_s_per_s": round(video_s / loop_s, 2), "pipeline_video_s_per_s": round(video_s / pipe_s, 2),
        "ratio_pipeline_over_loop": round(statistics.median(ratios), 3),
        **({"ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
            "per_round": [{"loop_s": round(runs["loop"][0], 2), "pipeline_s": round(runs["pipeline"][0], 2)}
                          for runs in rounds]} if args.rounds > 1 else {}),
        **({"serial_loop_s": round(statistics.median(serial), 2),
            "ratio_pipeline_over_serial_loop": round(statistics.median(serial) / pipe_s, 3)}
           if serial else {})}))


def one_round(cfg, args, out: Path, sides: list[str], threads: dict[str, str]) -> dict:
    """Each side once on a local Ray of its own: side -> what loop() / pipeline() returned."""
    import ray
    from ray.data import DataContext

    # address="local": a new cluster of our own, even when another one is running on this machine
    ray.init(address="local", num_cpus=args.cpus, object_store_memory=1024 * 2**20, include_dashboard=False,
             log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    runs = {}
    try:
        for side in sides:
            if side == "loop":
                with environment(threads):
                    runs["loop"] = loop(cfg, out / "loop_out")
                if args.also_serial_loop:
                    with environment({"OMP_NUM_THREADS": "1"}):
                        runs["loop_serial"] = loop(cfg, out / "loop_serial_out")
            else:
                runs["pipeline"] = pipeline(cfg, out / "pipe_out")
    finally:
        ray.shutdown()
    return runs

if __name__ == "__main__":
    main()
