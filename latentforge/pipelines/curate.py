"""The curation job: discover -> probe -> filter -> caption -> encode latents / text -> shards + manifest + card."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from latentforge.datasets import manifest as mf
from latentforge.datasets.shards import load_npy
from latentforge.pipelines.config import CurationConfig
from latentforge.pipelines.discover import discover, orphan_captions
from latentforge.pipelines.stage import Stage, apply_stage, stage_resources
from latentforge.pipelines.stages.caption_sidecar import CaptionSidecar
from latentforge.pipelines.stages.encode_latents import EncodeLatents
from latentforge.pipelines.stages.encode_text import EncodeText
from latentforge.pipelines.stages.filter_basic import FilterBasic
from latentforge.pipelines.stages.probe_media import ProbeMedia
from latentforge.pipelines.stages.write_shards import write_shard_group

STAGES: tuple[type[Stage], ...] = (ProbeMedia, FilterBasic, CaptionSidecar, EncodeLatents, EncodeText)
FORMAT_VERSION = 1


@dataclass
class CurationResult:
    dataset_dir: Path
    inputs: int
    kept: int
    rejected: int
    filtered: int
    reasons: dict[str, int]
    by_modality: dict[str, int]
    card: dict = field(repr=False, default_factory=dict)

    def metrics(self) -> dict[str, float]:
        base = {"inputs": self.inputs, "kept": self.kept, "rejected": self.rejected, "filtered": self.filtered}
        base.update({f"kept_{m}": n for m, n in self.by_modality.items()})
        base.update({f"reason_{r}": n for r, n in self.reasons.items()})
        return {k: float(v) for k, v in base.items()}


def config_hash(cfg: CurationConfig) -> str:
    return hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:16]


def stage_graph(cfg: CurationConfig) -> list[dict]:
    """The stage chain with each stage's resources, as it will be handed to Ray Data."""
    return [{"stage": s.name, **stage_resources(s, cfg).model_dump()} for s in STAGES]


def build_pipeline(rows: list[dict], cfg: CurationConfig, shard_dir: Path):
    import ray.data

    blocks = max(1, min(len(rows), len(rows) // 8))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    for stage in STAGES:
        ds = apply_stage(ds, stage, cfg)
    num_shards = rows[-1]["shard"] + 1
    return ds.groupby("shard", num_partitions=num_shards).map_groups(write_shard_group, fn_kwargs={"shard_dir": str(shard_dir), "max_bytes": int(cfg.max_shard_mb * 2**20)},
                                          batch_format="numpy")


def run_curation(cfg: CurationConfig, dataset_dir: Path) -> CurationResult:
    """Run the job on the connected Ray cluster and write the dataset to `dataset_dir`."""
    dataset_dir = Path(dataset_dir)
    shard_dir = dataset_dir / mf.SHARDS
    shard_dir.mkdir(parents=True, exist_ok=True)
    rows = discover(cfg.input_dir, cfg.samples_per_shard)
    if not rows:
        raise ValueError(f"no input files under {cfg.input_dir}")
    meta = build_pipeline(rows, cfg, shard_dir).take_all()
    return write_dataset(meta, rows, cfg, dataset_dir)


def write_dataset(meta: list[dict], rows: list[dict], cfg: CurationConfig, dataset_dir: Path) -> CurationResult:
    missing = {r["id"] for r in rows} - {m["id"] for m in meta}
    if missing or len(meta) != len(rows):  # every input must come out as a manifest or a rejects row
        raise RuntimeError(f"curation lost track of {len(missing)} inputs (got {len(meta)} of {len(rows)} rows)")
    kept = [m for m in meta if m["status"] == "ok"]
    for m in kept:
        m["shard"], m["latent_shape"] = m["shard_name"], [int(s) for s in m["latent_shape"]]
    others = [m for m in meta if m["status"] != "ok"]
    mf.write_table(mf.to_table(kept, mf.MANIFEST_SCHEMA), dataset_dir / mf.MANIFEST)
    mf.write_table(mf.to_table(others, mf.REJECTS_SCHEMA), dataset_dir / mf.REJECTS)
    card = build_card(kept, cfg, dataset_dir)
    (dataset_dir / mf.CARD).write_text(json.dumps(card, indent=2, sort_keys=True))
    return CurationResult(
        dataset_dir=dataset_dir, inputs=len(meta), kept=len(kept),
        rejected=sum(m["status"] == "rejected" for m in others),
        filtered=sum(m["status"] == "filtered" for m in others),
        reasons=dict(Counter(m["reason"] for m in others)), by_modality=dict(Counter(m["modality"] for m in kept)),
        card=card,
    )


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


def build_card(kept: list[dict], cfg: CurationConfig, dataset_dir: Path) -> dict:
    shards: dict[str, dict] = {}
    for m in kept:
        s = shards.setdefault(m["shard_name"], {"name": m["shard_name"], "sha256": m["shard_sha256"], "count": 0})
        s["count"] += 1
    buckets = Counter(m["bucket"] for m in kept)
    return {
        "format_version": FORMAT_VERSION,
        "name": cfg.name,
        "config_hash": config_hash(cfg),
        "num_samples": len(kept),
        "modalities": dict(Counter(m["modality"] for m in kept)),
        "encoders": encoder_descriptions(kept),
        "latent_stats": latent_statistics(kept),
        "buckets": dict(sorted(buckets.items())),
        "shards": sorted(shards.values(), key=lambda s: s["name"]),
        "parents": [],
        "orphan_captions": orphan_captions(cfg.input_dir),
        "config": json.loads(cfg.model_dump_json()),
    }
