"""The dataset card: what a curation job wrote (shards with their digests, counts, encoders, latent statistics)
and from what (config, its hash); its id is derived from both, so lineage can name the exact shards."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np

from latentforge.datasets import manifest as mf
from latentforge.datasets.shards import load_npy
from latentforge.pipelines.config import CurationConfig
from latentforge.pipelines.discover import orphan_captions
from latentforge.pipelines.stages.encode_repa import repa_description

FORMAT_VERSION = 1
# Raised when a change to the code alters what a job writes for the same config: the config hash includes it, so
# a resumed or incremental job redoes the groups an older version wrote instead of mixing both in one dataset.
# 2: audio resampled through an anti-aliasing filter (linear interpolation before, which aliased); transparent
#    pixels composited over white and 16-bit greys scaled (before: the stored colour, often black; clipped white);
#    PyAV turns frames by the display rotation as decord does.
OUTPUT_VERSION = 2


def config_hash(cfg: CurationConfig) -> str:
    """What the job produces depends on: the config less how it runs (resources, fusion), and OUTPUT_VERSION."""
    body = cfg.model_dump_json(exclude=set(cfg.EXECUTION_FIELDS))
    return hashlib.sha256(f"{OUTPUT_VERSION}|{body}".encode()).hexdigest()[:16]


def latent_statistics(kept: list[dict]) -> dict:
    """Per-channel mean / std per latent family, merged from the per-sample streaming sums."""
    parts: dict[str, list[np.ndarray]] = {}
    for m in kept:
        family = "audio" if m["modality"] == "audio" else "visual"
        parts.setdefault(family, []).append(load_npy(m["lat_stats"]))
    return {family: mf.merge_stats(p) for family, p in sorted(parts.items())}


def encoder_descriptions(kept: list[dict]) -> dict:
    """What the encode stages said about their encoders (one description per family; they must agree)."""
    out: dict[str, dict] = {}
    for m in kept:
        for family, column in (("audio" if m["modality"] == "audio" else "visual", "latent_encoder"),
                               ("text", "text_encoder")):
            desc = json.loads(m[column])
            if out.setdefault(family, desc) != desc:
                raise RuntimeError(f"{family} encoder differs between actors: {out[family]} vs {desc}")
    return out


def dataset_id(cfg: CurationConfig, shards: list[dict]) -> str:
    """Content-derived: the same config and the same shard bytes give the same id (lineage references it)."""
    digest = hashlib.sha256(config_hash(cfg).encode())
    for s in shards:
        digest.update(f"{s['name']}:{s['sha256']}".encode())
    return f"{cfg.name}-{digest.hexdigest()[:12]}"


def build_card(kept: list[dict], cfg: CurationConfig, dataset_dir: Path) -> dict:
    shards: dict[str, dict] = {}
    for m in kept:
        s = shards.setdefault(m["shard_name"], {"name": m["shard_name"], "sha256": m["shard_sha256"], "count": 0})
        s["count"] += 1
    buckets = Counter(m["bucket"] for m in kept)
    shard_list = sorted(shards.values(), key=lambda s: s["name"])
    return {
        "format_version": FORMAT_VERSION,
        "id": dataset_id(cfg, shard_list),
        "name": cfg.name,
        "config_hash": config_hash(cfg),
        "num_samples": len(kept),
        "modalities": dict(Counter(m["modality"] for m in kept)),
        "encoders": encoder_descriptions(kept) | ({"repa": repa} if (repa := repa_description(kept)) else {}),
        "latent_stats": latent_statistics(kept),
        "buckets": dict(sorted(buckets.items())),
        "shards": shard_list,
        "bucket_table": [b.model_dump() for b in cfg.bucket_table()],
        "parents": [],
        "orphan_captions": orphan_captions(cfg.input_dir),
        "config": json.loads(cfg.model_dump_json()),
    }
