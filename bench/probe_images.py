"""Image probe + near-duplicate hash: the full-size probe and the hash's own open (baseline) against the probe
decoding once at the hash's reduced JPEG scale and the hash taking its pixels, both measured in this run.

    .venv/bin/python bench/probe_images.py [--images 16] [--size 1920x1080] [--rounds 5]

Writes `--images` photo-like pictures (smooth colour fields with sensor-like noise) as JPEG (quality 90) and
as PNG, then times per image, one process, `--rounds` alternating rounds, medians:
- `probe` alone (curation with dedup off): the probe as it was (verify, then decode at full size) against
  `media.probe` now (verify, then decode at the smallest JPEG scale; every byte is still entropy-decoded,
  so a damaged body fails the same way);
- `probe_and_hash` (dedup on, the default): the probe as it was plus the hash's own open and decode
  (`dedup._image_for_hash`) against `media.probe(thumb_side=32)` and the pHash of its `key_frame`.
Checks that both ways give every image the same pHash. PNG has no reduced-scale decode, so there the saving
is the second open alone.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_images(root: Path, count: int, width: int, height: int, fmt: str) -> list[Path]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for i in range(count):
        periods = rng.uniform(20, 200, (3, 2))
        field = np.stack([np.sin(x / px + i) + np.cos(y / py) for px, py in periods], axis=-1) * 60 + 128
        pixels = np.clip(field + rng.normal(0, 10, field.shape), 0, 255).astype(np.uint8)
        path = root / f"img{i:03d}.{fmt}"
        Image.fromarray(pixels).save(path, **({"quality": 90} if fmt == "jpg" else {}))
        paths.append(path)
    return paths


def probe_before(path: Path) -> tuple[int, int]:
    """`media.probe` on an image as it was before this change: the same container checks and timeout thread,
    then verify and a full-size decode."""
    from latentforge.datasets import media

    def decode() -> tuple[int, int]:
        with Image.open(path) as img:
            media._check_pixels(*img.size, 64_000_000)
            img.verify()
        with Image.open(path) as img:
            img.load()
            return media._oriented_size(img)

    media._check_container(path)
    return media.run_with_timeout(decode, 30.0, "PIL")


def cases(side: int, hash_size: int) -> dict[str, dict]:
    from latentforge.datasets import media
    from latentforge.pipelines.stages.dedup import _image_for_hash, grey_thumbnail, phash, phash_of_grey

    def hash_before(path: Path) -> str:
        probe_before(path)
        return phash(_image_for_hash(str(path), side), hash_size)

    def hash_now(path: Path) -> str:
        return phash_of_grey(grey_thumbnail(media.probe(path, thumb_side=side).key_frame, hash_size), hash_size)

    return {"probe": {"before": probe_before, "now": lambda path: media.probe(path).width},
            "probe_and_hash": {"before": hash_before, "now": hash_now}}


def per_image(fn, paths: list[Path]) -> tuple[float, float, list]:
    """(CPU ms, wall ms) per image of `fn` over `paths`, and what it returned for each."""
    cpu, wall = time.process_time(), time.perf_counter()
    results = [fn(path) for path in paths]
    n = len(paths)
    return (time.process_time() - cpu) * 1e3 / n, (time.perf_counter() - wall) * 1e3 / n, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", default="1920x1080", help="WIDTHxHEIGHT of the generated pictures")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hash-size", type=int, default=8, help="dedup.hash_size (the probe's thumb_side is 4x)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    report: dict = {"images": args.images, "size": args.size, "rounds": args.rounds}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("jpg", "png"):
            paths = make_images(Path(tmp), args.images, width, height, fmt)
            for name, pair in cases(4 * args.hash_size, args.hash_size).items():
                for fn in pair.values():
                    fn(paths[0])  # warm-up: library initialisation is not what is measured
                times: dict[str, list[tuple[float, float]]] = {"before": [], "now": []}
                for r in range(args.rounds):
                    for side in (("before", "now") if r % 2 == 0 else ("now", "before")):
                        cpu, wall, results = per_image(pair[side], paths)
                        times[side].append((cpu, wall))
                        if name == "probe_and_hash":
                            report.setdefault(f"{fmt}_hashes_{side}", results)
                row = {f"{side}_{what}_ms": round(statistics.median(t[i] for t in times[side]), 2)
                       for side in times for i, what in enumerate(("cpu", "wall"))}
                row["cpu_ratio_before_over_now"] = round(row["before_cpu_ms"] / row["now_cpu_ms"], 2)
                row["wall_ratio_before_over_now"] = round(row["before_wall_ms"] / row["now_wall_ms"], 2)
                report[f"{fmt}_{name}"] = row
                print(f"{fmt} {name:15s} before {row['before_cpu_ms']:7.2f} CPU-ms  now {row['now_cpu_ms']:7.2f} "
                      f"CPU-ms per image  ({row['cpu_ratio_before_over_now']:.2f}x)")
            same = report.pop(f"{fmt}_hashes_before") == report.pop(f"{fmt}_hashes_now")
            report[f"{fmt}_same_hashes"] = same
            if not same:
                raise SystemExit(f"{fmt}: the two ways gave different pHashes")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
