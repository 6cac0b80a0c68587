"""Curation and shard reads on s3:// (an S3-compatible server on loopback) vs the same work on local disk.

    .venv/bin/python bench/storage.py [--images 24] [--videos 6] [--audio 6] [--cpus 4] [--rounds 3]

One local Ray, one demo corpus, one untimed local job first (worker start-up, page cache). Then, in the
same run, in this order:
- local: `run_curation` from a local directory to a local dataset (the baseline);
- s3: the corpus uploaded to a bucket on `moto_server` (started here on 127.0.0.1), `run_curation` from
  s3:// to s3://: listing, per-row scratch copies for the decoding stages, shard groups written locally
  and uploaded, tables and card uploaded; twice per round: with `fusion.keep_inputs_mb: 0` (every stage that
  decodes an input fetches it: the code before chains kept their copies) and with the default budget,
  alternating which goes first. moto's request log gives the GETs of input objects each made;
- verify of each dataset (sha256 and decode of every shard: s3 fetches each shard once);
- training reads: every shard through `storage.open_shard` (s3: cold cache, then warm) vs local files.

moto_server is a Python test server, not S3: the ratios bound what the code adds around the transfers on one
machine, not what a real object store costs.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def start_moto(log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or "moto_server"
    with open(log, "wb") as out:
        proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=2).close()
            return proc, url
        except OSError:
            time.sleep(0.3)
    raise RuntimeError("moto_server did not start")


def input_gets(log: Path, prefix: str) -> int:
    """GET requests for objects under `prefix` in moto_server's request log so far."""
    return sum(f"GET /{prefix}" in line for line in log.read_text(errors="replace").splitlines())


def fmt(seconds: list[float]) -> str:
    return "/".join(f"{x:.1f}" for x in seconds) + " s"


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def read_all(uris: list) -> int:
    from latentforge.datasets import storage

    total = 0
    for uri in uris:
        with storage.open_shard(uri) as f:
            total += len(f.read())
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--videos", type=int, default=6)
    ap.add_argument("--audio", type=int, default=6)
    ap.add_argument("--cpus", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="curation rounds (medians reported)")
    args = ap.parse_args()

    import pyarrow.fs as pafs
    import ray

    from latentforge.datasets import storage
    from latentforge.datasets.demo_corpus import DemoCorpusSpec, generate_demo_corpus
    from latentforge.datasets.manifest import Dataset
    from latentforge.datasets.verify import verify_dataset
    from latentforge.pipelines.config import CurationConfig
    from latentforge.pipelines.curate import run_curation

    tmp = Path(tempfile.mkdtemp(prefix="lf-bench-storage-"))
    proc, url = start_moto(tmp / "moto.log")
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"})
    try:
        host = url.split("://")[1]
        pafs.S3FileSystem(endpoint_override=host, scheme="http", allow_bucket_creation=True).create_dir("bench")
        storage.configure(storage.StorageConfig(endpoint_url=url, cache_dir=tmp / "cache"))
        generate_demo_corpus(tmp / "corpus", DemoCorpusSpec(num_images=args.images, num_videos=args.videos,
                                                            num_audio=args.audio, seed=3))
        _, upload_s = timed(storage.upload, tmp / "corpus", "s3://bench/corpus")
        ray.init(address="local", num_cpus=args.cpus, object_store_memory=512 * 2**20, include_dashboard=False,
                 log_to_driver=False)
        run_curation(CurationConfig(input_dir=tmp / "corpus", samples_per_shard=8), tmp / "warm-up")  # not timed:
        # the first job in a fresh Ray starts its workers and warms the page cache for all that follow
        times: dict[str, list[float]] = {"local": [], "every": [], "kept": []}
        gets: dict[str, int] = {}
        keep = {"every": 0, "kept": CurationConfig().fusion.keep_inputs_mb}
        for r in range(args.rounds):  # the two s3 variants alternate which goes first
            local, seconds = timed(run_curation, CurationConfig(input_dir=tmp / "corpus", samples_per_shard=8),
                                   tmp / f"ds-{r}")  # a new dataset each round: an existing one would resume
            times["local"].append(seconds)
            for variant in ("every", "kept") if r % 2 == 0 else ("kept", "every"):
                before = input_gets(tmp / "moto.log", "bench/corpus/")
                cfg = CurationConfig(input_dir="s3://bench/corpus", samples_per_shard=8,
                                     fusion={"keep_inputs_mb": keep[variant]})
                remote, seconds = timed(run_curation, cfg, f"s3://bench/ds-{variant}-{r}")
                times[variant].append(seconds)
                gets[variant] = input_gets(tmp / "moto.log", "bench/corpus/") - before
                assert (local.kept, local.rejected, local.filtered) == (remote.kept, remote.rejected, remote.filtered)
        local_s, every_s, remote_s = (statistics.median(times[k]) for k in ("local", "every", "kept"))
        v_local, v_local_s = timed(verify_dataset, tmp / "ds-0")
        v_remote, v_remote_s = timed(verify_dataset, "s3://bench/ds-kept-0")
        assert v_local.ok and v_remote.ok
        names = [s["name"] for s in local.card["shards"]]
        local_shards = [Dataset(tmp / "ds-0").shard_path(n) for n in names]
        remote_shards = [Dataset("s3://bench/ds-kept-0").shard_path(n) for n in names]
        nbytes, read_local_s = timed(read_all, local_shards)
        _, read_cold_s = timed(read_all, remote_shards)
        _, read_warm_s = timed(read_all, remote_shards)
    finally:
        ray.shutdown()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"corpus: {local.inputs} inputs ({local.samples} samples, {local.kept} kept); "
          f"upload to s3 {upload_s:.1f}s; {len(names)} shards, {nbytes / 2**20:.1f} MiB")
    print(f"curation: medians of {args.rounds} rounds; local {fmt(times['local'])}, s3 with keep_inputs_mb 0 "
          f"{fmt(times['every'])}, s3 default {fmt(times['kept'])}")
    print("| what | local (baseline) | s3 (moto, loopback) | ratio s3 / local |")
    print("|---|---|---|---|")
    print(f"| curation, every stage fetching its inputs (keep_inputs_mb 0) | {local_s:.1f} s | {every_s:.1f} s | "
          f"{every_s / local_s:.2f} |")
    print(f"| curation, run_curation wall time (default) | {local_s:.1f} s | {remote_s:.1f} s | "
          f"{remote_s / local_s:.2f} |")
    print(f"| verify (hash + decode every shard) | {v_local_s:.2f} s | {v_remote_s:.2f} s | "
          f"{v_remote_s / v_local_s:.2f} |")
    print(f"| read every shard, cold cache | {read_local_s:.3f} s | {read_cold_s:.3f} s | "
          f"{read_cold_s / read_local_s:.1f} |")
    print(f"| read every shard, warm cache | {read_local_s:.3f} s | {read_warm_s:.3f} s | "
          f"{read_warm_s / read_local_s:.1f} |")
    print(f"GETs of input objects: {gets['every']} with keep_inputs_mb 0, {gets['kept']} with the default "
          f"({gets['every'] / max(gets['kept'], 1):.2f}x fewer; {local.inputs} inputs); s3 curation time, default / "
          f"keep_inputs_mb 0: {remote_s / every_s:.2f}")


if __name__ == "__main__":
    main()
