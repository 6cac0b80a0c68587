"""Write each shard group's kept samples into a WebDataset tar with a stable name; return metadata rows."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from latentforge.datasets.shards import LatentShardWriter, load_npy, npy_bytes, sha256_file
from latentforge.pipelines.stage import rows_of

HEAVY = ("latent", "text_emb", "text_mask")
META_KEYS = ("id", "relpath", "modality", "width", "height", "num_frames", "fps", "duration_s", "sample_rate",
             "bucket")


def shard_name(index: int) -> str:
    return f"shard-{int(index):06d}.tar"


def _meta(row: dict) -> dict:
    return {k: (row[k].item() if isinstance(row[k], np.generic) else row[k]) for k in META_KEYS}


def write_shard_group(batch: dict, shard_dir: str) -> dict:
    """`groupby("shard").map_groups(write_shard_group, ...)`: one tar per group, samples in id order."""
    rows = sorted(rows_of(batch), key=lambda r: r["id"])
    kept = [r for r in rows if r["status"] == "ok"]
    name, digest = "", ""
    if kept:
        name = shard_name(kept[0]["shard"])
        path = Path(shard_dir) / name
        with LatentShardWriter(path) as writer:
            for row in kept:
                writer.write(row["id"], {
                    "latent.npy": row["latent"],
                    # fp16 in transit through Ray; stored as float32 like the other members.
                    "text.npy": npy_bytes(load_npy(row["text_emb"]).astype(np.float32)),
                    "text_mask.npy": row["text_mask"],
                    "caption.txt": str(row["caption"]).encode("utf-8"),
                    "meta.json": json.dumps(_meta(row), sort_keys=True).encode("utf-8"),
                })
        digest = sha256_file(path)
    out = {k: v for k, v in batch.items() if k not in HEAVY}
    ok = np.asarray(batch["status"]) == "ok"
    out["shard_name"] = np.where(ok, name, "").astype(object)
    out["shard_sha256"] = np.where(ok, digest, "").astype(object)
    return out
