"""Encode-stage throughput vs a bare loop calling the same VAE, both measured in this run.

    .venv/bin/python bench/encode.py [--images 96] [--size 128] [--batch 8]

The stage runs as Ray Data runs it in a curation job (EncodeLatents in an actor, rows in, npy bytes out);
the bare loop decodes the same files and calls the same VAE in one process. Prints images/s for both and
the ratio stage / bare. The VAE is an AutoencoderKL with random weights (SD-like layout, reduced width) so
the benchmark runs offline.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def make_images(root: Path, n: int, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"img_{i:05d}.png")
        (root / f"img_{i:05d}.txt").write_text(f"image {i}")


def make_vae(root: Path) -> str:
    import diffusers
    import torch

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64, 128, 128), down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4,
                                  norm_num_groups=32, scaling_factor=0.18215)
    vae.save_pretrained(str(root))
    return str(root)


def bare_loop(paths: list[Path], vae_dir: str, size: int, batch: int) -> float:
    import torch

    from latentforge.datasets import media
    from latentforge.datasets.encoders.config import AutoencoderKLConfig
    from latentforge.datasets.encoders.pretrained import AutoencoderKLEncoder

    encoder = AutoencoderKLEncoder(AutoencoderKLConfig(kind="autoencoder_kl", model=vae_dir, device="cpu",
                                                       dtype="float32"))
    torch.set_num_threads(2)
    start = time.perf_counter()
    for i in range(0, len(paths), batch):
        frames = np.stack([media.decode_image(p, (size, size))[None] for p in paths[i:i + batch]])
        encoder.encode(frames)
    return len(paths) / (time.perf_counter() - start)


def stage_rows(corpus: Path, vae_dir: str, size: int, batch: int):
    from latentforge.pipelines.config import CurationConfig
    from latentforge.pipelines.discover import discover
    from latentforge.pipelines.stage import rows_of
    from latentforge.pipelines.stages.probe_media import ProbeMedia

    cfg = CurationConfig.model_validate({
        "input_dir": str(corpus), "image_size": size,
        "encoders": {"visual": {"kind": "autoencoder_kl", "model": vae_dir, "device": "cpu", "dtype": "float32"}},
        "resources": {"encode_latents": {"num_cpus": 2, "batch_size": batch, "pool": 1}}})
    rows = discover(corpus, 10**6)
    columns = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    return cfg, rows_of(ProbeMedia(cfg)(columns))  # probing is not what is measured


def stage_callable(corpus: Path, vae_dir: str, size: int, batch: int) -> float:
    """The same stage as a plain callable in this process: what the stage costs without Ray."""
    import torch

    from latentforge.pipelines.stages.encode_latents import EncodeLatents

    cfg, rows = stage_rows(corpus, vae_dir, size, batch)
    stage = EncodeLatents(cfg)
    torch.set_num_threads(2)
    start = time.perf_counter()
    for i in range(0, len(rows), batch):
        part = rows[i:i + batch]
        stage({k: np.array([r[k] for r in part], dtype=object) for k in part[0]})
    return len(rows) / (time.perf_counter() - start)


def stage_run(corpus: Path, vae_dir: str, size: int, batch: int) -> float:
    import ray

    from latentforge.pipelines.stage import apply_stage
    from latentforge.pipelines.stages.encode_latents import EncodeLatents

    cfg, rows = stage_rows(corpus, vae_dir, size, batch)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // batch))
    start = time.perf_counter()
    out = apply_stage(ds, EncodeLatents, cfg).take_all()
    elapsed = time.perf_counter() - start
    assert sum(r["status"] == "ok" for r in out) == len(rows)
    return len(rows) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_images(tmp / "corpus", args.images, args.size)
        vae_dir = make_vae(tmp / "vae")
        paths = sorted((tmp / "corpus").glob("*.png"))
        ray.init(num_cpus=4, object_store_memory=512 * 2**20, include_dashboard=False, log_to_driver=False)
        bare = bare_loop(paths, vae_dir, args.size, args.batch)
        plain = stage_callable(tmp / "corpus", vae_dir, args.size, args.batch)
        stage = stage_run(tmp / "corpus", vae_dir, args.size, args.batch)
        ray.shutdown()
    print(json.dumps({"images": args.images, "size": args.size, "batch": args.batch,
                      "bare_loop_images_per_s": round(bare, 2), "stage_callable_images_per_s": round(plain, 2),
                      "stage_on_ray_data_images_per_s": round(stage, 2), "ratio_callable_over_bare": round(plain / bare, 3),
                      "ratio_ray_data_over_bare": round(stage / bare, 3)}))


if __name__ == "__main__":
    main()
