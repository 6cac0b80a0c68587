"""The dataset on disk: a Parquet manifest (one row per kept sample), a rejects table and a dataset card.

    DATASET/
      shards/shard-000000.tar ...   latent samples (see shards.py)
      manifest.parquet              kept samples: where they came from, their shape, bucket, scores, caption, shard
      rejects.parquet               every input that was not kept, with the stage and reason
      card.json                     encoders, latent statistics, shard checksums, config hash
"""
from __future__ import annotations

import difflib
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable
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
logger = logging.getLogger(__name__)

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


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A table (metadata rows in columns: pipelines/meta.py) with exactly `schema`'s columns, each cast to its
    type (dictionary-encoded columns decoded; missing columns null; extra columns dropped), rows as they are."""
    columns = []
    for f in schema:
        if f.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, f.type))
            continue
        column = table[f.name]
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        columns.append(column.cast(f.type))
    return pa.Table.from_arrays(columns, schema=schema)


ROW_GROUP = 1 << 15  # rows per Parquet row group when a table is written in parts (write_rows)


def write_rows(table: pa.Table, positions: pa.Array, schema: pa.Schema, path: Path,
               prepare: Callable[[pa.Table], pa.Table] | None = None, rows_per_group: int = ROW_GROUP) -> None:
    """The rows of `table` at `positions`, in that order, through `prepare` and conformed to `schema`, written
    to a Parquet file one row group at a time: the selection is never copied whole (a job's manifest is the
    driver's largest table)."""
    tmp = path.with_suffix(".partial")
    with pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, len(positions), rows_per_group):
            part = table.take(positions.slice(start, rows_per_group))
            writer.write_table(conform(prepare(part) if prepare is not None else part, schema))
    tmp.replace(path)


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
        """Kept rows of `modalities` (all when None) matching `where`. Rows with no value in a column `where`
        names (an image's motion score) match nothing; a warning says how many, by modality, since a selection
        over mixed modalities otherwise loses a whole modality silently."""
        table = self.manifest()
        expr = pc.field("status") == "ok"
        if modalities:
            expr = expr & pc.field("modality").isin(modalities)
        if not where:
            return table.filter(expr)
        condition = parse_where(where, table.schema)
        _warn_unscored(table.filter(expr), where, self.root)
        return table.filter(expr & condition)


# --- selection queries -------------------------------------------------------------------------------------
# A deliberately small grammar evaluated by pyarrow.compute: comparisons `column OP value` joined by `and`, a
# value being a number or one quoted string ('...' or "..."; no escapes, so a string holding both kinds of
# quote cannot be written). `or`, `not` and parentheses are refused, not half-understood. A query is data,
# and eval-style engines would run code from a config file.
_TOKEN = re.compile(r"""\s*(?:('[^']*'|"[^"]*")|(==|!=|>=|<=|>|<)|([^\s'"()=!<>]+)|(\S))""")
_KINDS = (None, "quoted", "op", "word", "other")  # by regex group
_COLUMN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_UNSUPPORTED = {"or", "not", "(", ")"}
_OPS = {"==": pc.equal, "!=": pc.not_equal, ">=": pc.greater_equal, "<=": pc.less_equal,
        ">": pc.greater, "<": pc.less}


def parse_where(where: str, schema: pa.Schema) -> pc.Expression:
    """`"score_resolution >= 64 and modality == 'image'"` -> a pyarrow compute expression.

    A number is compared in the column's own type (for a float32 score, the literal rounded to float32), so
    re-selecting with a curation threshold keeps every row curation kept at exactly that threshold. A NaN or
    null score matches no comparison, `!=` included (like SQL's NULL)."""
    expr = None
    for clause in _clauses(where):
        text = _span(where, clause)
        if len(clause) < 2 or clause[0][0] != "word" or not _COLUMN.match(clause[0][1]) or clause[1][0] != "op":
            raise ValueError(f"cannot parse selection clause {text!r}: expected 'column OP value'")
        column, op = where_column(clause[0][1], schema.names), clause[1][1]
        value = _literal(where, clause[2:], text)
        term = _comparison(column, schema.field(column).type, op, value, _span(where, clause[2:]))
        expr = term if expr is None else (expr & term)
    return expr


def where_column(name: str, names: list[str]) -> str:
    """The manifest column a selection names: the column itself, or a score by its short name (`aesthetic` for
    `score_aesthetic`, as a selection is usually written). Refused with the closest names otherwise."""
    if name in names:
        return name
    if f"score_{name}" in names:
        return f"score_{name}"
    short = {n.removeprefix("score_"): n for n in names}
    close = {}  # full column -> the name it was matched by (a score once, by its short name first)
    for match in difflib.get_close_matches(name, list(short) + list(names), n=4, cutoff=0.6):
        close.setdefault(short.get(match, match), match)
    hint = f"; did you mean {' or '.join(repr(c) for c in close.values())}?" if close else ""
    scores = ", ".join(n for n in names if n.startswith("score_"))
    raise ValueError(f"selection names unknown column {name!r}{hint} (scores: {scores}; the other columns: "
                     f"{', '.join(n for n in names if not n.startswith('score_'))})")


def _warn_unscored(candidates: pa.Table, where: str, root) -> None:
    for column in dict.fromkeys(where_column(c[0][1], candidates.schema.names) for c in _clauses(where) if c):
        values = candidates[column]
        missing = pc.is_null(values, nan_is_null=True) if pa.types.is_floating(values.type) else pc.is_null(values)
        unscored = candidates.filter(missing)
        if unscored.num_rows:
            by = Counter(unscored["modality"].to_pylist())
            logger.warning("selection %r on %s: %d kept rows have no %s and match nothing (%s)", where, root,
                           unscored.num_rows, column, ", ".join(f"{m} {n}" for m, n in sorted(by.items())))


def _clauses(where: str) -> list[list[tuple[str, str, int, int]]]:
    """Tokens (kind, text, start, end) split on `and` outside quotes; `or`, `not` and parentheses refused."""
    tokens, pos = [], 0
    while where[pos:].strip():
        match = _TOKEN.match(where, pos)
        group = match.lastindex
        tokens.append((_KINDS[group], match.group(group), match.start(group), match.end()))
        pos = match.end()
    for kind, text, _, _ in tokens:
        if kind in ("word", "other") and text.lower() in _UNSUPPORTED:
            raise ValueError(f"cannot parse selection {where!r}: {text!r} is not supported; a selection is "
                             "comparisons joined by `and` (no `or`, `not` or parentheses)")
    # `and` separates two clauses; a leading or trailing one stays in its clause, which then fails to parse.
    cuts = [i for i, (kind, text, _, _) in enumerate(tokens)
            if kind == "word" and text.lower() == "and" and 0 < i < len(tokens) - 1]
    return [tokens[a + 1:b] for a, b in zip([-1, *cuts], [*cuts, len(tokens)])]


def _span(where: str, tokens: list[tuple[str, str, int, int]]) -> str:
    return where[tokens[0][2]:tokens[-1][3]].strip() if tokens else ""


def _literal(where: str, tokens: list[tuple[str, str, int, int]], clause: str) -> str | int | float:
    """Exactly one quoted string or one number: `'image' or modality == 'video'` is never one string."""
    text = _span(where, tokens)
    if len(tokens) == 1 and tokens[0][0] == "quoted":
        return text[1:-1]
    if len(tokens) == 1 and tokens[0][0] == "word":
        for number in (int, float):  # an integer stays exact for integer columns
            try:
                value = number(text)
            except ValueError:
                continue
            if isinstance(value, float) and math.isnan(value):
                raise ValueError(f"selection clause {clause!r} compares with NaN, which matches nothing")
            return value
    raise ValueError(f"selection value {text!r} in {clause!r} must be a number or a quoted string")


def _is_text(t: pa.DataType) -> bool:
    view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow >= 16
    return pa.types.is_string(t) or pa.types.is_large_string(t) or view(t)


def _comparison(column: str, type_: pa.DataType, op: str, value, literal: str) -> pc.Expression:
    field = pc.field(column)
    if _is_text(type_):
        if not isinstance(value, str):
            raise ValueError(f"column {column!r} holds {type_}: compare it with a quoted string, not {literal}")
        return _OPS[op](field, value)
    if not (pa.types.is_integer(type_) or pa.types.is_floating(type_)):
        raise ValueError(f"column {column!r} holds {type_}: a selection compares only string and number columns")
    if isinstance(value, str):
        raise ValueError(f"column {column!r} holds {type_}: compare it with a number, not {literal}")
    if pa.types.is_floating(type_):
        # In the column's type: a score stored as float32(0.3) equals `0.3`, as curation's `>= 0.3` meant.
        term = _OPS[op](field, pa.scalar(float(value), type=type_))
        return term & ~pc.is_nan(field) if op == "!=" else term  # NaN is unequal to everything, yet no match
    if isinstance(value, int):
        try:
            return _OPS[op](field, pa.scalar(value, type=type_))  # exact, even past float64's 2**53
        except (OverflowError, pa.ArrowInvalid):
            pass  # outside the column's range: float64 still orders it right
    return _OPS[op](field, pa.scalar(float(value)))  # 63.5 against an integer column


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
