"""The dataset on disk: a Parquet manifest (one row per kept sample), a rejects table and a dataset card.

    DATASET/
      shards/shard-000000.tar ...   latent samples (see shards.py)
      manifest.parquet              kept samples: where they came from, their shape, bucket, scores, caption, shard
      rejects.parquet               every input that was not kept, with the stage and reason
      card.json                     encoders, latent statistics, shard checksums, config hash
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from latentforge.datasets import storage

MANIFEST = "manifest.parquet"
REJECTS = "rejects.parquet"
CARD = "card.json"
SHARDS = "shards"

MANIFEST_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source_id", pa.string()),
        ("uri", pa.string()),
        ("relpath", pa.string()),
        ("modality", pa.string()),
        ("clip_index", pa.int32()),
        ("clip_start_s", pa.float32()),
        ("clip_end_s", pa.float32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("num_frames", pa.int32()),
        ("fps", pa.float32()),
        ("duration_s", pa.float32()),
        ("sample_rate", pa.int32()),
        ("decoder", pa.string()),
        ("bucket", pa.string()),
        ("latent_shape", pa.list_(pa.int32())),
        ("caption", pa.string()),
        ("caption_origin", pa.string()),  # which source became `caption`: sidecar, vlm or audio
        ("caption_sidecar", pa.string()),  # the sidecar (alt-text) caption as found, kept beside generated ones
        ("caption_generated", pa.string()),  # vision-language captioner (cleaned)
        ("caption_audio", pa.string()),  # Whisper transcript (cleaned)
        ("caption_error", pa.string()),  # why a caption source gave nothing
        ("score_resolution", pa.float32()),
        ("score_duration", pa.float32()),
        ("score_sample_rate", pa.float32()),
        ("score_caption_words", pa.float32()),
        ("score_sharpness", pa.float32()),
        ("score_motion", pa.float32()),
        ("score_motion_jitter", pa.float32()),
        ("score_text_area", pa.float32()),
        ("score_aesthetic", pa.float32()),
        ("score_nsfw", pa.float32()),
        ("score_loudness", pa.float32()),
        ("score_silence_ratio", pa.float32()),
        ("score_clipping_ratio", pa.float32()),
        ("score_speech_ratio", pa.float32()),
        ("content_sha256", pa.string()),
        ("phash", pa.string()),
        ("shard", pa.string()),
        ("status", pa.string()),
    ]
)

REJECTS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source_id", pa.string()),
        ("uri", pa.string()),
        ("relpath", pa.string()),
        ("modality", pa.string()),
        ("status", pa.string()),  # "rejected" (unusable) or "filtered" (usable, below a threshold)
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("message", pa.string()),
        ("duplicate_of", pa.string()),
    ]
)


def to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows -> a table with exactly `schema`'s columns (extra keys dropped), sorted by id."""
    columns = {f.name: [row.get(f.name) for row in rows] for f in schema}
    table = pa.Table.from_pydict(columns, schema=schema)
    return table.sort_by("id") if table.num_rows else table


def read_table(location: Path | str) -> pa.Table:
    fs, path = storage.resolve(location)
    return pq.read_table(path, filesystem=fs)


def write_table(table: pa.Table, path: Path) -> None:
    tmp = path.with_suffix(".partial")
    pq.write_table(table, tmp)
    tmp.replace(path)


@dataclass(frozen=True)
class Dataset:
    """A curated dataset directory, local or at a URI (s3://bucket/prefix: see storage.py)."""

    root: Path | str

    def __post_init__(self):
        object.__setattr__(self, "root", storage.as_location(self.root))

    @property
    def card(self) -> dict:
        return json.loads(storage.read_text(storage.join(self.root, CARD)))

    def manifest(self) -> pa.Table:
        return read_table(storage.join(self.root, MANIFEST))

    def rejects(self) -> pa.Table:
        return read_table(storage.join(self.root, REJECTS))

    def shard_path(self, name: str) -> Path | str:
        """A shard's local path, or its URI for a remote dataset (training opens it with storage.open_shard)."""
        if storage.is_remote(self.root):
            if not name or "/" in name or name in (".", ".."):
                raise ValueError(f"manifest names shard {name!r} outside {storage.join(self.root, SHARDS)}")
            return storage.join(self.root, SHARDS, name)
        path = (self.root / SHARDS / name).resolve()
        if path.parent != (self.root / SHARDS).resolve():
            raise ValueError(f"manifest names shard {name!r} outside {self.root / SHARDS}")
        return path

    def select(self, where: str | None = None, modalities: list[str] | None = None) -> pa.Table:
        table = self.manifest()
        expr = pc.field("status") == "ok"
        if modalities:
            expr = expr & pc.field("modality").isin(modalities)
        if where:
            expr = expr & parse_where(where, table.schema)
        return table.filter(expr)


# --- selection queries -------------------------------------------------------------------------------------
# A deliberately small grammar (comparisons joined by `and`) evaluated by pyarrow.compute: a query is data,
# and eval-style engines would run code from a config file.
_AND_OUTSIDE_QUOTES = re.compile(r"""\s+and\s+(?=(?:[^'"]|'[^']*'|"[^"]*")*$)""", re.IGNORECASE)
_CLAUSE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(==|!=|>=|<=|>|<)\s*(.+?)\s*$")
_OPS = {"==": pc.equal, "!=": pc.not_equal, ">=": pc.greater_equal, "<=": pc.less_equal,
        ">": pc.greater, "<": pc.less}


def parse_where(where: str, schema: pa.Schema) -> pc.Expression:
    """`"score_resolution >= 64 and modality == 'image'"` -> a pyarrow compute expression."""
    expr = None
    for clause in _AND_OUTSIDE_QUOTES.split(where.strip()):
        match = _CLAUSE.match(clause)
        if not match:
            raise ValueError(f"cannot parse selection clause {clause!r}: expected 'column OP value'")
        column, op, literal = match.groups()
        if column not in schema.names:
            raise ValueError(f"selection names unknown column {column!r}; columns: {', '.join(schema.names)}")
        value = _literal(literal)
        is_text = pa.types.is_string(schema.field(column).type)
        if isinstance(value, str) != is_text:
            raise ValueError(f"column {column!r} holds {schema.field(column).type}: compare it with a "
                             f"{'quoted string' if is_text else 'number'}, not {literal}")
        term = _OPS[op](pc.field(column), value)
        expr = term if expr is None else (expr & term)
    if expr is None:
        raise ValueError("empty selection")
    return expr


def _literal(text: str):
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    try:
        return float(text)
    except ValueError as e:
        raise ValueError(f"selection value {text!r} must be a number or a quoted string") from e


# --- latent statistics ------------------------------------------------------------------------------------
def channel_stats(latent: np.ndarray) -> np.ndarray:
    """(3, C) float64: count, sum and sum of squares per channel, for streaming mean / std."""
    flat = latent.reshape(latent.shape[0], -1).astype(np.float64)
    return np.stack([np.full(flat.shape[0], flat.shape[1], np.float64), flat.sum(1), (flat**2).sum(1)])


def merge_stats(parts: list[np.ndarray]) -> dict:
    total = np.sum(parts, axis=0)
    count, s, ss = total
    mean = s / count
    std = np.sqrt(np.maximum(ss / count - mean**2, 1e-12))
    return {"mean": mean.tolist(), "std": std.tolist(), "count": int(count[0])}
