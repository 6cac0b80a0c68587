"""The driver's tail of a curation job at corpus scale: the samples' metadata rows collected from the stream,
readmission, then the manifest, rejects table and card. Columns (now) vs one dict per row (the code before).

    git worktree add /tmp/lf-before bdd89dd          # the code before (dicts), once
    .venv/bin/python bench/metadata.py --rows 100000 300000 1000000 --before /tmp/lf-before

Each size and side runs in a fresh process (so its peak RSS is its own), on the code at `--before` (put first
on sys.path) or on this checkout. The rows come as Ray Data's numpy batches of 32, each flagged as written by the
workers (the path a cluster job takes: write_finished_groups), from a stand-in for the dataset's `iter_batches`
that builds each batch as it is asked for. They are manifest-shaped: 49 columns as a job writes them (ids,
paths, signatures, 64-hex content hashes, pHashes, scores, captions, encoder descriptions, npy latent statistics),
85% kept, 9% filtered at a stage, 4% duplicates (a tenth of them of representatives a later stage filtered, for
readmission to curate again), 2% rejected. Both sides are handed the same rows and must write the same manifest,
rejects table and card (checked by comparing digests of the tables' rows and of the card across the two processes).

Reports, per side: seconds to collect the rows (`write_groups`), to readmit, and to write the dataset; the RSS
the collected rows hold; and the peak RSS over the whole tail, both above the process's RSS before the first row.
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
BATCH = 32
GROUP = 64
STAGES = ("filter_sharpness", "filter_text_area", "score_aesthetic", "filter_audio_quality")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plan(n: int, seed: int = 0):
    """Per row: status code (0 ok, 1 filtered at a stage, 2 duplicate, 3 rejected) and the row a duplicate points
    at; a tenth of the duplicates point at a representative a later stage filtered."""
    import numpy as np

    rng = np.random.default_rng(seed)
    status = rng.choice(4, size=n, p=[0.85, 0.09, 0.04, 0.02])
    ok = np.flatnonzero(status == 0)
    failed = np.flatnonzero(status == 1)
    dup = np.flatnonzero(status == 2)
    rep = np.full(n, -1)
    rep[dup] = ok[rng.integers(0, len(ok), len(dup))]
    some = dup[rng.random(len(dup)) < 0.1]
    if len(failed) and len(some):
        rep[some] = failed[rng.integers(0, len(failed), len(some))]
    return status, rep, rng.integers(0, 2**63, size=(n, 2))


def batches(n: int, seed: int = 0):
    """The job's metadata rows as numpy batches of BATCH rows (numpy object columns of str, typed numbers)."""
    import numpy as np

    from latentforge.datasets.shards import npy_bytes

    status, rep, bits = plan(n, seed)
    encoder = json.dumps({"audio_channels": 2, "channels": 4, "class": "AutoencoderKL",
                          "config_hash": "861874adffb0a7b1", "dtype": "float32", "kind": "sd-vae",
                          "model": "/models/sd-vae-ft-mse", "revision": None, "sample": "mode", "scale": 0.18215,
                          "shift": 0.0, "subfolder": None}, sort_keys=True)
    text = json.dumps({"config_hash": "80d9f9fa894cc043", "dim": 768, "dtype": "float32", "kind": "t5",
                       "max_len": 120, "max_len_clamped": False, "model": "/models/t5-base", "requested_max_len": 120,
                       "revision": None, "subfolder": None, "tokenizer": "T5TokenizerFast"}, sort_keys=True)
    kinds = ("image", "video", "audio")
    words = "a photo of the cat dog street at night with lights over city river bridge old new".split()
    for start in range(0, n, BATCH):
        idx = np.arange(start, min(n, start + BATCH))
        k = len(idx)
        st = status[idx]
        sid = [f"s{hashlib.sha1(str(i).encode()).hexdigest()[:16]}" for i in idx]
        rel = [f"{kinds[i % 3]}s/part{i // 10000:04d}/file_{i:08d}.{('jpg', 'mp4', 'wav')[i % 3]}" for i in idx]
        kept = st == 0
        status_text = np.array([("ok", "filtered", "filtered", "rejected")[s] for s in st], dtype=object)
        stage = np.array(["", STAGES[0], "dedup", "probe"], dtype=object)[st]
        stage[st == 1] = [STAGES[i % len(STAGES)] for i in idx[st == 1]]
        reason = np.array(["", "below_threshold", "duplicate_near", "undecodable"], dtype=object)[st]
        dup_of = np.array([f"s{hashlib.sha1(str(r).encode()).hexdigest()[:16]}" if r >= 0 else "" for r in rep[idx]],
                          dtype=object)
        group = idx // GROUP
        yield {
            "id": np.array(sid, dtype=object), "source_id": np.array(sid, dtype=object),
            "uri": np.array([f"/data/corpus/{r}" for r in rel], dtype=object), "relpath": np.array(rel, dtype=object),
            "caption_path": np.array([f"/data/corpus/{r.rsplit('.', 1)[0]}.txt" for r in rel], dtype=object),
            "input_signature": np.array([f"{100000 + i * 7}:{1795876400226611053 + i}|64:{1795876400226673877 + i}"
                                         for i in idx], dtype=object),
            "modality": np.array([kinds[i % 3] for i in idx], dtype=object), "status": status_text,
            "stage": stage, "reason": reason,
            "message": np.array([f"score 0.{i % 97:02d} below 0.30" if s == 1 else "" for i, s in zip(idx, st)],
                                dtype=object),
            "duplicate_of": dup_of, "clip_index": np.full(k, -1, np.int64),
            "clip_start_s": np.zeros(k), "clip_end_s": (idx % 3 == 1) * 4.0,
            "width": np.where(idx % 3 == 2, 0, 512), "height": np.where(idx % 3 == 2, 0, 384),
            "num_frames": np.where(idx % 3 == 1, 96, 1), "fps": (idx % 3 == 1) * 24.0,
            "duration_s": (idx % 3 != 0) * 4.0, "sample_rate": np.where(idx % 3 == 2, 16000, 0),
            "decoder": np.array([("pillow", "decord", "soundfile")[i % 3] for i in idx], dtype=object),
            "bucket": np.array([("512x384", "8x512x384", "64000samples@16000Hz")[i % 3] for i in idx], dtype=object),
            "latent_shape": np.array([("[4, 48, 64]", "[4, 2, 48, 64]", "[4, 500, 1, 1]")[i % 3] if ok else ""
                                      for i, ok in zip(idx, kept)], dtype=object),
            "lat_stats": np.array([npy_bytes(np.full((3, 4), float(i % 1000))) if ok else b""
                                   for i, ok in zip(idx, kept)], dtype=object),
            "latent_encoder": np.array([encoder] * k, dtype=object), "text_encoder": np.array([text] * k, dtype=object),
            "caption": np.array([" ".join(words[(i + j) % len(words)] for j in range(8 + i % 6)) for i in idx],
                                dtype=object),
            "caption_origin": np.array(["sidecar"] * k, dtype=object),
            "caption_sidecar": np.array([""] * k, dtype=object),
            "caption_generated": np.array([""] * k, dtype=object), "caption_audio": np.array([""] * k, dtype=object),
            "caption_error": np.array([""] * k, dtype=object),
            **{f"score_{s}": (idx % 101) / 100.0 for s in (
                "resolution", "duration", "sample_rate", "caption_words", "sharpness", "motion", "motion_jitter",
                "text_area", "aesthetic", "nsfw", "loudness", "silence_ratio", "clipping_ratio", "speech_ratio")},
            "content_sha256": np.array([f"{a:016x}{b:016x}" * 2 for a, b in bits[idx]], dtype=object),
            "phash": np.array([f"{a:016x}" if i % 3 != 2 else "" for i, (a, _) in zip(idx, bits[idx])], dtype=object),
            "shard": group,
            "shard_name": np.array([f"shard-{g:06d}-00.tar" if ok else "" for g, ok in zip(group, kept)], dtype=object),
            "shard_sha256": np.array([hashlib.sha256(str(g).encode()).hexdigest() if ok else ""
                                      for g, ok in zip(group, kept)], dtype=object),
            "source_rows": np.ones(k, np.int64), "group_written": np.ones(k, bool),
        }


class Stream:
    """The part of a Ray Dataset that write_groups reads: its batches, built as they are asked for."""

    def __init__(self, n: int) -> None:
        self.n = n

    def iter_batches(self, **_):
        return batches(self.n)


def child(n: int, out: Path, corpus: Path, resume: bool = False) -> dict:
    """One side's tail on `n` rows, in this process (the code on sys.path decides which side), after a warm-up
    run on a few rows, so modules and Arrow's kernels are loaded before the baseline RSS is taken."""
    run = resume_tail if resume else tail
    run(256, out / "warm", corpus)
    return run(n, out / "run", corpus)


def resume_tail(n: int, out: Path, corpus: Path) -> dict:
    """A rerun that finds every shard group done: the markers read back (`done_groups`), the groups checked
    against the inputs (`regroup`), then readmission and the dataset written from the finished rows alone."""
    from latentforge.pipelines import curate
    from latentforge.pipelines.config import CurationConfig
    from latentforge.pipelines.readmit import earlier_groups, readmit
    from latentforge.pipelines.resume import done_groups, regroup, write_marker

    cfg = CurationConfig(input_dir=str(corpus), samples_per_shard=GROUP)
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True)
    inputs, group_rows = [], []
    for batch in batches(n):  # markers as the job writes them (outside the measurement)
        batch.pop("group_written")
        for i in range(len(batch["id"])):
            row = {k: v[i] for k, v in batch.items()}
            inputs.append({"id": str(row["id"]), "relpath": str(row["relpath"]), "shard": int(row["shard"]),
                           "input_signature": str(row["input_signature"])})
            group_rows.append(row)
            if len(group_rows) == GROUP or len(inputs) == n:
                for name in {str(r["shard_name"]) for r in group_rows if r["shard_name"]}:
                    (shard_dir / name).touch()
                write_marker(shard_dir, int(row["shard"]), group_rows, curate.config_hash(cfg))
                group_rows = []
    stats = _stats()

    def again(todo: list[dict]) -> list[dict]:
        return [{**r, "shard_name": f"shard-{int(r['shard']):06d}-00.tar", "shard_sha256": "0" * 64,
                 "latent_shape": "[4, 48, 64]", "lat_stats": stats} for r in todo]

    base = rss_mb()
    (out / "ds").mkdir(parents=True)
    t0 = time.perf_counter()
    done = done_groups(shard_dir, curate.config_hash(cfg))
    readmitted_done = earlier_groups(done)
    assigned = regroup(inputs, done, set(readmitted_done), GROUP)
    kept, stale = assigned[-2:]  # the rows come first since they are a table (before: sorted in place)
    finished = done.rows() if hasattr(done, "rows") else [r for g, rows in sorted(done.items()) for r in rows]
    t1 = time.perf_counter()
    held = rss_mb() - base
    meta, readmitted = readmit(finished, cfg.dedup, {s.name for s in curate.STAGES} | set(STAGES),
                               1 + n // GROUP, GROUP, readmitted_done, again, lambda g, rows: None)
    t2 = time.perf_counter()
    result = curate.write_dataset(meta, inputs, cfg, out / "ds")
    t3 = time.perf_counter()
    return {"rows": n, "groups": len(done), "stale": len(stale), "read_s": round(t1 - t0, 2),
            "readmit_s": round(t2 - t1, 2), "write_s": round(t3 - t2, 2), "total_s": round(t3 - t0, 2),
            "held_mb": round(held), "peak_mb": round(peak_mb() - base), **_outputs(out / "ds", result, readmitted)}


def _outputs(ds: Path, result, readmitted: int) -> dict:
    card = json.loads((ds / "card.json").read_text())
    return {"kept": result.kept, "readmitted": readmitted,
            "card": hashlib.sha256(json.dumps(card, sort_keys=True).encode()).hexdigest()[:16],
            "tables": {name: content_digest(ds / name) for name in ("manifest.parquet", "rejects.parquet")}}


def tail(n: int, out: Path, corpus: Path) -> dict:
    from latentforge.pipelines import curate
    from latentforge.pipelines.config import CurationConfig
    from latentforge.pipelines.readmit import readmit
    from latentforge.pipelines.shard_writes import write_groups

    status, _, _ = plan(n)
    inputs = [{"id": f"s{hashlib.sha1(str(i).encode()).hexdigest()[:16]}", "shard": i // GROUP} for i in range(n)]
    cfg = CurationConfig(input_dir=str(corpus), samples_per_shard=GROUP)  # an empty input root, for the card

    stats = _stats()

    def again(todo: list[dict]) -> list[dict]:  # readmission's candidates pass: kept, in a new group
        return [{**r, "shard_name": f"shard-{int(r['shard']):06d}-00.tar", "shard_sha256": "0" * 64,
                 "latent_shape": "[4, 48, 64]", "lat_stats": stats} for r in todo]

    base = rss_mb()
    (out / "ds").mkdir(parents=True)
    t0 = time.perf_counter()
    meta = write_groups(Stream(n), inputs, {"shard_dir": str(out), "max_bytes": 2**30, "config_hash": None})
    t1 = time.perf_counter()
    held = rss_mb() - base
    meta, readmitted = readmit(meta, cfg.dedup, {s.name for s in curate.STAGES} | set(STAGES),
                               1 + n // GROUP, GROUP, {}, again, lambda g, rows: None)
    t2 = time.perf_counter()
    result = curate.write_dataset(meta, inputs, cfg, out / "ds")
    t3 = time.perf_counter()
    return {"rows": n, "collect_s": round(t1 - t0, 2), "readmit_s": round(t2 - t1, 2), "write_s": round(t3 - t2, 2),
            "total_s": round(t3 - t0, 2), "held_mb": round(held), "peak_mb": round(peak_mb() - base),
            "ok": int((status == 0).sum()), **_outputs(out / "ds", result, readmitted)}


def content_digest(path: Path) -> str:
    """A Parquet file's schema and rows, digested (its row groups may differ: the code before wrote one)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path).combine_chunks()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue()).hexdigest()[:16]


def _stats() -> bytes:
    import numpy as np

    from latentforge.datasets.shards import npy_bytes

    return npy_bytes(np.full((3, 4), 1.0))


def run_side(n: int, src: Path, corpus: Path, resume: bool = False) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    with tempfile.TemporaryDirectory(prefix="lf-meta-") as tmp:
        proc = subprocess.run([sys.executable, __file__, "--child", str(n), "--out", tmp, "--corpus", str(corpus)]
                              + (["--resume"] if resume else []), env=env, cwd=src, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{src} at {n} rows failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 300_000])
    parser.add_argument("--before", type=Path, help="a checkout of the code before (dicts); omitted: now only")
    parser.add_argument("--before-max", type=int, default=10**9, help="the largest size to run the code before on")
    parser.add_argument("--resume", action="store_true",
                        help="measure a rerun that finds every group done (markers read back) instead of a first run")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.out, args.corpus, args.resume)))
        return
    bad = False
    corpus = Path(tempfile.mkdtemp(prefix="lf-meta-corpus-"))  # empty: both sides' cards name the same input root
    for n in args.rows:
        now = run_side(n, HERE, corpus, args.resume)
        row = {"rows": n, "now": now}
        if args.before is not None and n <= args.before_max:
            before = run_side(n, args.before.resolve(), corpus, args.resume)
            same = all(before[k] == now[k] for k in ("kept", "readmitted", "card", "tables"))
            row.update(before=before, same_output=same,
                       peak_ratio=round(before["peak_mb"] / max(1, now["peak_mb"]), 2),
                       held_ratio=round(before["held_mb"] / max(1, now["held_mb"]), 2),
                       speedup=round(before["total_s"] / max(1e-9, now["total_s"]), 2))
            bad |= not same
        print(json.dumps(row), flush=True)
    corpus.rmdir()
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
