"""The dataset card: what a curation job wrote (shards with their digests, counts, encoders, latent statistics)
and from what (config, its hash); its id is derived from both, so lineage can name the exact shards."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from latentforge.datasets import manifest as mf
from latentforge.datasets.shards import load_npy
from latentforge.pipelines.config import CurationConfig
from latentforge.pipelines.discover import orphan_captions
from latentforge.pipelines.meta import counts, strings
from latentforge.pipelines.stages.encode_repa import repa_description

FORMAT_VERSION = 1
# Raised when a change to the code alters what a job writes for the same config: the config hash includes it, so
# a resumed or incremental job redoes the groups an older version wrote instead of mixing both in one dataset.
# 2: audio resampled through an anti-aliasing filter (linear interpolation before, which aliased); transparent
#    pixels composited over white and 16-bit greys scaled (before: the stored colour, often black; clipped white);
#    PyAV turns frames by the display rotation as decord does.
OUTPUT_VERSION = 2
# What build_card reads of the kept rows (the job hands it only these columns).
COLUMNS = ("modality", "shard_name", "shard_sha256", "bucket", "latent_encoder", "text_encoder", "repa_encoder",
           "lat_stats")


def config_hash(cfg: CurationConfig) -> str:
    """What the job produces depends on: the config less how it runs (resources, fusion), and OUTPUT_VERSION."""
    body = cfg.model_dump_json(exclude=set(cfg.EXECUTION_FIELDS))
    return hashlib.sha256(f"{OUTPUT_VERSION}|{body}".encode()).hexdigest()[:16]


def latent_statistics(kept: pa.Table) -> dict:
    """Per-channel mean / std per latent family, merged from the per-sample streaming sums (`lat_stats`)."""
    family = _families(kept)
    return {name: mf.merge_stats(_stacked(kept["lat_stats"].filter(pc.equal(family, name))))
            for name in sorted(set(pc.unique(family).to_pylist()))}


def _stacked(column: pa.ChunkedArray) -> np.ndarray:
    """npy values of one dtype and shape, as one array: a view of the Arrow buffer when they share one header (as
    the encode stages write them: one load_npy per column, not per row), else read one at a time."""
    values = pa.chunked_array(column).combine_chunks()
    first = load_npy(values[0].as_py())
    wide = pa.types.is_large_binary(values.type)
    offsets = np.frombuffer(values.buffers()[1], np.int64 if wide else np.int32)[
        values.offset:values.offset + len(values) + 1].astype(np.int64)
    lengths = np.diff(offsets)
    header = int(lengths[0]) - first.nbytes
    if values.null_count or (lengths != lengths[0]).any() or header <= 0:
        return np.stack([load_npy(v) for v in values.to_pylist()])
    data = np.frombuffer(values.buffers()[2], np.uint8)
    word = 8 if header % 8 == 0 else 1  # npy headers are padded to 64 bytes: compared 8 bytes at a time
    heads = np.ndarray((len(values), header // word), f"u{word}", data, int(offsets[0]), (int(lengths[0]), word))
    if not (heads == heads[0]).all():
        return np.stack([load_npy(v) for v in values.to_pylist()])
    return np.ndarray((len(values), *first.shape), first.dtype, data, int(offsets[0]) + header,
                      (int(lengths[0]), *first.strides))


def _families(kept: pa.Table) -> pa.Array:
    """Each row's latent family: "audio" for audio rows, "visual" for images and video."""
    return pc.if_else(pc.equal(strings(kept, "modality"), "audio"), "audio", "visual").combine_chunks()


def encoder_descriptions(kept: pa.Table) -> dict:
    """What the encode stages said about their encoders (one description per family; they must agree).
    Each distinct description is parsed once (they repeat on every row)."""
    out: dict[str, dict] = {}
    family = _families(kept)
    for name, column in [(f, "latent_encoder") for f in ("visual", "audio")] + [("text", "text_encoder")]:
        values = strings(kept, column)
        values = values if name == "text" else values.filter(pc.equal(family, name))
        for text in _distinct(values):
            desc = json.loads(text)
            if out.setdefault(name, desc) != desc:
                raise RuntimeError(f"{name} encoder differs between actors: {out[name]} vs {desc}")
    return out


def _distinct(column: pa.ChunkedArray) -> list[str]:
    """The distinct non-empty strings of a column (meta.strings)."""
    return [v for v in pc.unique(column).to_pylist() if v]


def dataset_id(cfg: CurationConfig, shards: list[dict]) -> str:
    """Content-derived: the same config and the same shard bytes give the same id (lineage references it)."""
    digest = hashlib.sha256(config_hash(cfg).encode())
    for s in shards:
        digest.update(f"{s['name']}:{s['sha256']}".encode())
    return f"{cfg.name}-{digest.hexdigest()[:12]}"


def build_card(kept: pa.Table, cfg: CurationConfig, dataset_dir: Path) -> dict:
    """The card of the kept rows (metadata, meta.py: shard_name, shard_sha256, bucket, modality, the encoder
    descriptions, lat_stats)."""
    names = strings(kept, "shard_name")
    per_shard = counts(names)
    distinct = pa.array(sorted(per_shard), pa.string())
    digests = strings(kept, "shard_sha256").take(pc.index_in(distinct, value_set=names.combine_chunks()))
    shard_list = [{"name": n, "sha256": d, "count": per_shard[n]}
                  for n, d in zip(distinct.to_pylist(), digests.to_pylist())]
    buckets = counts(strings(kept, "bucket"))
    return {
        "format_version": FORMAT_VERSION,
        "id": dataset_id(cfg, shard_list),
        "name": cfg.name,
        "config_hash": config_hash(cfg),
        "num_samples": kept.num_rows,
        "modalities": counts(strings(kept, "modality")),
        "encoders": encoder_descriptions(kept) | ({"repa": repa} if (repa := repa_description(
            _distinct(strings(kept, "repa_encoder")))) else {}),
        "latent_stats": latent_statistics(kept),
        "buckets": dict(sorted(buckets.items())),
        "shards": shard_list,
        "bucket_table": [b.model_dump() for b in cfg.bucket_table()],
        "parents": [],
        "orphan_captions": orphan_captions(cfg.input_dir),
        "config": json.loads(cfg.model_dump_json()),
    }
