"""Video decode throughput: decord vs PyAV on the same files, both measured in this run.

    .venv/bin/python bench/decode.py [--videos 16] [--frames 96] [--size 256] [--sampled 8]

Writes `--videos` H.264 files (moving shapes, as the demo corpus does) and decodes them two ways with each
decoder, RGB uint8 out, one process:
- all frames in order (decord `get_batch` over every index; PyAV `container.decode` + `to_ndarray`);
- `--sampled` evenly spaced frames per video, as curation's stages ask for them (decord seeks by index through
  `video._decord_decode`; PyAV decodes sequentially up to the last wanted frame in `video._pyav_decode`, the
  fallback path the project uses when decord fails), resized to 64x64.
Prints frames/s for each and the ratio decord / PyAV. The first file is decoded once beforehand (warm-up).

Then decoder threads (`--rounds` alternating rounds, medians): the project's decord paths, the probe (open,
decode the first and last frame) and the sampled decode, once with FFmpeg's default threads (what a process
outside Ray gets) and once on one thread (what a curation worker granted one CPU gets, `video.open_decord`);
CPU and wall milliseconds per video, and the ratio default / one thread.

Last, the scan's probe and near-duplicate hash of a whole video on one thread (`probe_and_hash`): the probe
decoding both ends and the hash opening the video again for its middle frame (the code before), against the
probe decoding the middle frame on the same open and the hash taking it from the probe (`key_frame`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import unittest.mock
from pathlib import Path

import numpy as np


def make_videos(root: Path, count: int, frames: int, size: int) -> list[Path]:
    from latentforge.datasets.demo_corpus import _moving_frames, encode_video

    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        pixels, _ = _moving_frames(rng, size, frames)
        encode_video(root / f"v{i:03d}.mp4", pixels, 24)
        paths.append(root / f"v{i:03d}.mp4")
    return paths


def decord_all(path: Path) -> int:
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    return len(reader.get_batch(list(range(len(reader)))).asnumpy())


def pyav_all(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return sum(1 for frame in container.decode(stream) if frame.to_ndarray(format="rgb24") is not None)


def timed(fn, paths: list[Path]) -> float:
    """Frames per second of `fn` (returns frames decoded) over all `paths`."""
    fn(paths[0])  # warm-up: library initialisation is not what is measured
    start, frames = time.perf_counter(), 0
    for path in paths:
        frames += fn(path)
    return frames / (time.perf_counter() - start)


def per_video(fn, paths: list[Path], threads: str | None) -> tuple[float, float]:
    """(CPU ms, wall ms) per video of `fn` over `paths`, with OMP_NUM_THREADS (what open_decord reads) set to
    `threads` or unset."""
    with unittest.mock.patch.dict(os.environ):  # the stdlib's set-and-restore of a dict, not a mock
        os.environ.pop("OMP_NUM_THREADS", None)
        if threads is not None:
            os.environ["OMP_NUM_THREADS"] = threads
        cpu, wall = time.process_time(), time.perf_counter()
        for path in paths:
            fn(path)
        return (1000 * (time.process_time() - cpu) / len(paths), 1000 * (time.perf_counter() - wall) / len(paths))


def thread_figures(paths: list[Path], sampled: int, rounds: int) -> dict:
    from latentforge.datasets import video

    cases = {"probe": video.decord_probe, "sampled": lambda path: video._decord_decode(path, sampled, (64, 64))}
    out = {}
    for name, fn in cases.items():
        fn(paths[0])
        got = {"default_threads": [], "one_thread": []}
        for _ in range(rounds):  # alternating, so drift in the machine's speed hits both alike
            got["default_threads"].append(per_video(fn, paths, None))
            got["one_thread"].append(per_video(fn, paths, "1"))
        medians = {f"{setting}_{kind}_ms": statistics.median(run[k] for run in runs)
                   for setting, runs in got.items() for k, kind in enumerate(("cpu", "wall"))}
        out[name] = {key: round(value, 2) for key, value in medians.items()}
        for kind in ("cpu", "wall"):
            ratio = medians[f"default_threads_{kind}_ms"] / medians[f"one_thread_{kind}_ms"]
            out[name][f"{kind}_ratio_default_over_one"] = round(ratio, 3)
    return out


def key_frame_figures(paths: list[Path], rounds: int) -> dict:
    """Probe + the near-duplicate hash of a whole video, on one decoder thread (a curation worker's), two ways:
    the probe decoding the first and last frame and the hash opening the video again for its middle frame
    (before), against the probe decoding the middle frame too and the hash taking it from there (now)."""
    from latentforge.datasets import video
    from latentforge.pipelines.stages.dedup import grey_thumbnail, phash, phash_of_grey

    def before(path: Path) -> str:
        reader = video.open_decord(path)  # the probe as it was: both ends
        n = len(reader)
        ends = reader.get_batch([0, n - 1]).asnumpy()
        return phash(video.decode_video(path, 1, ends.shape[1:3])[0][0])  # the hash's own open and decode

    def now(path: Path) -> str:
        return phash_of_grey(grey_thumbnail(video.decord_probe(path).key_frame))

    assert all(before(p) == now(p) for p in paths)  # the same hashes
    got: dict[str, list[tuple[float, float]]] = {"two_opens": [], "one_open": []}
    for _ in range(rounds):
        got["two_opens"].append(per_video(before, paths, "1"))
        got["one_open"].append(per_video(now, paths, "1"))
    out = {f"{name}_{kind}_ms": round(statistics.median(run[k] for run in runs), 2)
           for name, runs in got.items() for k, kind in enumerate(("cpu", "wall"))}
    for kind in ("cpu", "wall"):
        out[f"{kind}_ratio_two_over_one"] = round(out[f"two_opens_{kind}_ms"] / out[f"one_open_{kind}_ms"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--frames", type=int, default=96, help="frames per video")
    parser.add_argument("--size", type=int, default=256, help="video side (px)")
    parser.add_argument("--sampled", type=int, default=8, help="evenly spaced frames per video in the sampled mode")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the decoder-threads comparison")
    args = parser.parse_args()
    from latentforge.datasets import video

    def sampled(decode):
        return lambda path: len(decode(path, args.sampled, (64, 64))[0])

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_videos(Path(tmp), args.videos, args.frames, args.size)
        figures = {
            "all_frames": {"decord": timed(decord_all, paths), "pyav": timed(pyav_all, paths)},
            "sampled": {"decord": timed(sampled(video._decord_decode), paths),
                        "pyav": timed(sampled(video._pyav_decode), paths)},
        }
        threads = thread_figures(paths, args.sampled, args.rounds)
        key_frame = key_frame_figures(paths, args.rounds)
    out = {"videos": args.videos, "frames": args.frames, "size": args.size, "sampled_per_video": args.sampled}
    for mode, fps in figures.items():
        out[f"{mode}_decord_frames_per_s"] = round(fps["decord"], 1)
        out[f"{mode}_pyav_frames_per_s"] = round(fps["pyav"], 1)
        out[f"{mode}_ratio_decord_over_pyav"] = round(fps["decord"] / fps["pyav"], 3)
    out["decoder_threads"] = threads
    out["probe_and_hash"] = key_frame
    print(json.dumps(out))


if __name__ == "__main__":
    main()
