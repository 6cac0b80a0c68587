"""A rerun's done-markers read back from an object store: `done_groups` with its reader threads (now) vs one
marker after another (`readers=1`, what it did before), in the same run.

    .venv/bin/python bench/markers.py --groups 500 2000 --rounds 3
    .venv/bin/python bench/markers.py --groups 500 2000 --rounds 3 --latency-ms 20

The markers are written as a job writes them (`write_marker`, 64 manifest-shaped rows each, from
bench/metadata.py's rows; one small tar per group) into a local shard directory and uploaded to a bucket on
`moto_server`, started here on 127.0.0.1. Then, per round, `done_groups` reads them back both ways (alternating
which goes first) and both must return the same groups and rows. moto is a Python test server on loopback, not
S3: a request there costs what moto and the client spend on it, a few ms, where S3's round trip is ~10-30 ms,
so the ratio here is what threads win against the cheapest requests there are. `--latency-ms` adds a modelled
round trip to each marker read (a sleep: it holds no CPU), to show what they win where requests wait on the
network.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
GROUP = 64


def write_markers(shard_dir: Path, groups: int, config_hash: str) -> None:
    from metadata import batches

    from latentforge.pipelines.resume import write_marker

    shard_dir.mkdir(parents=True)
    rows = []
    for batch in batches(groups * GROUP):
        batch.pop("group_written", None)
        rows += [{k: v[i] for k, v in batch.items()} for i in range(len(batch["id"]))]
    for g in range(groups):
        group_rows = rows[g * GROUP:(g + 1) * GROUP]
        for row in group_rows:
            row["shard"] = g
            if row.get("shard_name"):
                row["shard_name"] = f"shard-{g:06d}-00.tar"
        (shard_dir / f"shard-{g:06d}-00.tar").write_bytes(b"\0" * 1024)
        write_marker(shard_dir, g, group_rows, config_hash)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, nargs="+", default=[500])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="a wait added to each marker read (time.sleep, as a round trip to S3 would: no CPU, "
                             "the GIL released); 0: moto's own cost only")
    args = parser.parse_args()

    import pyarrow.fs as pafs
    from storage import start_moto

    from latentforge.datasets import storage
    from latentforge.pipelines.resume import READERS, done_groups

    if args.latency_ms:
        read_text = storage.read_text

        def far_read_text(location):
            time.sleep(args.latency_ms / 1000)
            return read_text(location)

        storage.read_text = far_read_text

    tmp = Path(tempfile.mkdtemp(prefix="lf-bench-markers-"))
    proc, url = start_moto(tmp / "moto.log")
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"})
    try:
        pafs.S3FileSystem(endpoint_override=url.split("://")[1], scheme="http",
                          allow_bucket_creation=True).create_dir("bench")
        storage.configure(storage.StorageConfig(endpoint_url=url, cache_dir=tmp / "cache"))
        for groups in args.groups:
            local = tmp / f"shards-{groups}"
            write_markers(local, groups, "bench")
            remote = f"s3://bench/shards-{groups}"
            storage.upload(local, remote)
            times: dict[str, list[float]] = {"one": [], "threads": []}
            results = {}
            for r in range(args.rounds):
                for way in ("one", "threads") if r % 2 == 0 else ("threads", "one"):
                    start = time.perf_counter()
                    done = done_groups(remote, "bench", readers=1 if way == "one" else None)
                    times[way].append(time.perf_counter() - start)
                    results[way] = done
            one, threads = results["one"], results["threads"]
            same = one.bounds == threads.bounds and one.table.equals(threads.table) and len(one) == groups
            median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
            print(json.dumps({"groups": groups, "rows": one.table.num_rows, "readers": READERS,
                              "latency_ms": args.latency_ms,
                              "one_s": [round(x, 2) for x in times["one"]],
                              "threads_s": [round(x, 2) for x in times["threads"]],
                              "speedup": round(median["one"] / median["threads"], 2), "same": same}), flush=True)
            if not same:
                raise SystemExit("the two ways disagree")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
