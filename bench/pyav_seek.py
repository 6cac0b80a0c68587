"""AV1 films, which decord cannot open, through PyAV: seeking to the frames asked for (now) against decoding
from the first frame on every call (the code before), both measured in this run.

    .venv/bin/python bench/pyav_seek.py [--videos 2] [--seconds 120] [--shot-seconds 2] [--size 256] [--noise 8]

Writes `--videos` AV1 files (libsvtav1 at its default keyframe interval, 24 fps, a new shot every
`--shot-seconds`, `--noise` grain), then, one process, `--rounds` alternating rounds, medians, the baseline
forcing `seek=False` in `video._pyav_frames` (the probe then decodes up to the last frame, the frames of a
window or clip from the first frame):
- scan: `ProbeMedia` and `SplitClips` (shot detection in windows, cuts on native frames), one clip per shot;
- decodes: `video.decode_clip` of every clip in order (4 frames at 128 px, what each scoring stage and
  encoder asks for).
Checks that both ways give the same clips and the same frames. Reports CPU and wall ms per clip.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from long_videos import clips_of, decode_all, make_videos


def encode_av1(path: Path, frames: np.ndarray, fps: int) -> None:
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libsvtav1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for pixels in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())


def main() -> None:
    from latentforge.datasets import video

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--shot-seconds", type=float, default=2.0)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--noise", type=float, default=8.0, help="grain (std of 8-bit levels) on every frame")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    seeking = video._pyav_frames

    def from_start(*args, **kwargs):
        return seeking(*args, **{**kwargs, "seek": False})

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_videos(root, args.videos, args.seconds, args.shot_seconds, args.size, args.noise, encode=encode_av1)
        ways = {"from_start": from_start, "seeking": seeking}
        times: dict[str, list[tuple[float, float]]] = {}
        results: dict[str, object] = {}
        n = 0
        for r in range(args.rounds):
            for way in (("from_start", "seeking") if r % 2 == 0 else ("seeking", "from_start")):
                video._pyav_frames = ways[way]
                for part in ("scan", "decode"):
                    cpu, wall = time.process_time(), time.perf_counter()
                    if part == "scan":
                        _, clips = clips_of(root, args.shot_seconds)
                        results[f"{way}_scan"] = clips
                        n = len(clips["id"])
                    else:
                        results[f"{way}_decode"] = decode_all(results[f"{way}_scan"])
                    times.setdefault(f"{way}_{part}", []).append(
                        ((time.process_time() - cpu) * 1e3 / n, (time.perf_counter() - wall) * 1e3 / n))
        video._pyav_frames = seeking
        a, b = results["from_start_scan"], results["seeking_scan"]
        if set(a["decoder"]) != {"pyav"} or any(list(a[k]) != list(b[k]) for k in
                                                 ("id", "status", "clip_start_s", "clip_end_s", "num_frames")):
            raise SystemExit("the two ways cut different clips (or decord opened the files)")
        if any(not np.array_equal(x, y) for x, y in zip(results["from_start_decode"], results["seeking_decode"])):
            raise SystemExit("seeking gave other frames than decoding from the start")
        mb = sum(p.stat().st_size for p in root.glob("*.mp4")) / args.videos / 2**20
        report = {"videos": args.videos, "seconds": args.seconds, "clips": n, "size": args.size,
                  "noise": args.noise, "file_mb": round(mb, 2)}
        for key, t in times.items():
            report[f"{key}_cpu_ms"] = round(statistics.median(x[0] for x in t), 2)
            report[f"{key}_wall_ms"] = round(statistics.median(x[1] for x in t), 2)
        for part in ("scan", "decode"):
            before, now = report[f"from_start_{part}_cpu_ms"], report[f"seeking_{part}_cpu_ms"]
            report[f"{part}_cpu_ratio"] = round(before / now, 2)
            report[f"{part}_wall_ratio"] = round(report[f"from_start_{part}_wall_ms"] / report[f"seeking_{part}_wall_ms"], 2)
            print(f"{n} clips of {args.videos} AV1 videos of {args.seconds:g} s ({report['file_mb']} MB each), {part}: "
                  f"from the start {before} CPU-ms, seeking {now} CPU-ms per clip ({report[f'{part}_cpu_ratio']}x); "
                  f"wall {report[f'{part}_wall_ratio']}x")
        print(json.dumps(report))


if __name__ == "__main__":
    main()
