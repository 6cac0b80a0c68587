"""The driver's head of a curation job at corpus scale: the inputs listed (`discover`), their digest (what the
orchestrator records), their shard groups (`regroup`) and the table the scan's first map is made from. One Arrow
table (now) vs one dict per input (the code before).

    git worktree add /tmp/lf-before 3fea946          # the code before (dicts), once
    .venv/bin/python bench/discover.py --inputs 300000 1000000 --before /tmp/lf-before

A tree of empty media files (`--per-dir` to a directory, every other one with a `.txt` caption beside it) is made
once per size under `--tree` (a temporary directory unless given; reused when it is there). Each size and side
then runs in a fresh process (so its peak RSS is its own), on the code at `--before` (put first on sys.path) or
on this checkout, with the page cache warm (an untimed `os.walk` of the tree first). Both sides must list the
same inputs with the same groups and digest (checked across the two processes).

Reports, per side: seconds to list, to digest, to regroup and to make the scan's table; the RSS the listed inputs
hold; and the peak RSS over all of it, both above the process's RSS before the listing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
GROUP = 64


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_tree(root: Path, n: int, per_dir: int) -> Path:
    """`n` empty media files, `per_dir` to a directory, half of them with a caption; made once (a marker file
    says it is complete)."""
    done = root / f".complete-{n}-{per_dir}"
    if done.exists():
        return root
    exts = (".jpg", ".png", ".mp4", ".wav")
    for d in range(0, n, per_dir):
        folder = root / f"part-{d // per_dir:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(d, min(n, d + per_dir)):
            name = folder / f"sample_{i:08d}{exts[i % len(exts)]}"
            name.touch()
            if i % 2:
                name.with_suffix(".txt").touch()
    done.touch()
    return root


def child(root: str, before: str | None) -> dict:
    if before:
        sys.path.insert(0, before)
    else:
        sys.path.insert(0, str(HERE))
    import gc

    import pyarrow as pa

    from latentforge.pipelines import discover as discover_mod
    from latentforge.pipelines.resume import regroup

    import pyarrow.compute as pc

    for _ in os.walk(root):  # page cache and dentries warm, untimed
        pass
    warm = pa.Table.from_pylist([{"a": "b", "n": 1}] * 1000)  # Arrow's allocator and kernels loaded, both sides
    warm.take(pc.sort_indices(warm, [("n", "ascending"), ("a", "ascending")]))
    del warm
    gc.collect()
    base = rss_mb()
    t0 = time.perf_counter()
    table = getattr(discover_mod, "discover_table", None)
    rows = table(root, GROUP) if table else discover_mod.discover(root, GROUP)
    t1 = time.perf_counter()
    gc.collect()
    held = rss_mb() - base
    digest = discover_mod.inputs_digest(rows)
    t2 = time.perf_counter()
    assigned = regroup(rows, {}, set(), GROUP)  # a first run: no finished groups
    rows = assigned[0] if len(assigned) == 3 else rows  # before: sorted in place, (kept, stale) returned
    t3 = time.perf_counter()
    # the table the scan's first map is sliced from: before, input_dataset made it from the dicts
    scan_table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows)
    t4 = time.perf_counter()
    groups = hashlib.sha256()
    for name in ("id", "shard"):
        groups.update(json.dumps(scan_table[name].to_pylist()).encode())
    return {"inputs": scan_table.num_rows, "list_s": round(t1 - t0, 2), "digest_s": round(t2 - t1, 2),
            "regroup_s": round(t3 - t2, 2), "table_s": round(t4 - t3, 2), "total_s": round(t4 - t0, 2),
            "held_mb": round(held), "peak_mb": round(peak_mb() - base), "digest": digest,
            "groups": groups.hexdigest()[:16]}


def run_side(root: Path, before: str | None) -> dict:
    cmd = [sys.executable, __file__, "--child", str(root)] + (["--before", before] if before else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=HERE)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, nargs="+", default=[100_000])
    parser.add_argument("--per-dir", type=int, default=1000)
    parser.add_argument("--tree", type=Path, help="where the trees are made (default: a temporary directory)")
    parser.add_argument("--before", help="a checkout of the code before (dicts); without it, now only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.before)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.inputs:
            root = make_tree((args.tree or Path(tmp)) / f"tree-{n}", n, args.per_dir)
            now = run_side(root, None)
            before = run_side(root, args.before) if args.before else None
            print(json.dumps({"now": now, **({"before": before} if before else {})}), flush=True)
            if before:
                same = all(now[k] == before[k] for k in ("inputs", "digest", "groups"))
                print(f"{n:>10,} inputs: list {before['list_s']} -> {now['list_s']} s, total {before['total_s']} -> "
                      f"{now['total_s']} s ({before['total_s'] / max(now['total_s'], 1e-9):.2f}x); held "
                      f"{before['held_mb']} -> {now['held_mb']} MB ({before['held_mb'] / max(now['held_mb'], 1):.1f}x "
                      f"less); peak {before['peak_mb']} -> {now['peak_mb']} MB; same inputs, groups and digest: "
                      f"{same}", flush=True)
                if not same:
                    raise SystemExit("the two sides disagree")


if __name__ == "__main__":
    main()
