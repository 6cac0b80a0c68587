"""`verify`: re-check a dataset against its own card and manifest (counts, checksums, schema, shapes)."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from latentforge.datasets import manifest as mf
from latentforge.datasets import storage
from latentforge.datasets.shards import ShardFormatError, iter_shards, sha256_file


@dataclass
class VerifyReport:
    root: Path | str
    problems: list[str] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)  # worth saying, not wrong

    @property
    def ok(self) -> bool:
        return not self.problems


def _read_parts(root: Path | str, report: VerifyReport) -> tuple[dict, list[dict]] | None:
    try:
        card = json.loads(storage.read_text(storage.join(root, mf.CARD)))
    except (OSError, ValueError) as e:
        report.problems.append(f"{mf.CARD}: cannot read ({e})")
        return None
    for name, schema in ((mf.MANIFEST, mf.MANIFEST_SCHEMA), (mf.REJECTS, mf.REJECTS_SCHEMA)):
        try:
            fs, path = storage.resolve(storage.join(root, name))
            found = pq.read_schema(path, filesystem=fs)
        except (OSError, ValueError) as e:
            report.problems.append(f"{name}: cannot read ({e})")
            return None
        missing = set(schema.names) - set(found.names)
        if missing:
            report.problems.append(f"{name}: missing columns {sorted(missing)}")
    fs, path = storage.resolve(storage.join(root, mf.MANIFEST))
    present = pq.read_schema(path, filesystem=fs).names
    # Only the columns the checks compare become dicts: a million rows of every column took gigabytes.
    table = pq.read_table(path, filesystem=fs, columns=[c for c in _CHECKED if c in present])
    return card, table.to_pylist()


_CHECKED = ("id", "shard", "latent_shape", "caption")  # the manifest columns verify_dataset compares


def verify_dataset(root: str | Path, *, decode: bool = True) -> VerifyReport:
    """Check that the card, manifest and shards agree; with `decode`, read every sample and check its shape.

    `root` may be a URI (s3://...): each shard is then fetched to a scratch file once, checked, and deleted."""
    root = storage.as_location(root)
    report = VerifyReport(root)
    parts = _read_parts(root, report)
    if parts is None:
        return report
    card, rows = parts
    ids = Counter(r["id"] for r in rows)
    report.problems += [f"manifest: id {i} appears {n} times" for i, n in ids.items() if n > 1]
    if card.get("num_samples") != len(rows):
        report.problems.append(f"card says {card.get('num_samples')} samples, manifest has {len(rows)}")
    by_shard: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_shard.setdefault(r["shard"], {})[r["id"]] = r
    listed = {s["name"]: s for s in card.get("shards", [])}
    for name in sorted(set(by_shard) - set(listed)):
        report.problems.append(f"manifest names shard {name} that the card does not list")
    for name, entry in sorted(listed.items()):
        _verify_shard(root, entry, by_shard.get(name, {}), card, report, decode)
    return report


def _verify_shard(root: Path | str, entry: dict, expected: dict[str, dict], card: dict, report: VerifyReport,
                  decode: bool) -> None:
    name = entry["name"]
    try:
        path = mf.Dataset(root).shard_path(name)
    except ValueError as e:
        report.problems.append(str(e))
        return
    with storage.local_copy(path) as local:  # the shard itself when local
        if not local.is_file():
            report.problems.append(f"{name}: missing")
            return
        report.checked["shards"] += 1
        digest = sha256_file(local)
        if digest != entry.get("sha256"):
            report.problems.append(f"{name}: sha256 {digest[:12]}... does not match the card's "
                                   f"{str(entry.get('sha256'))[:12]}...")
        if entry.get("count") != len(expected):
            report.problems.append(f"{name}: card counts {entry.get('count')} samples, manifest {len(expected)}")
        if decode:
            _verify_samples(name, local, expected, card, report)


def _verify_samples(name: str, path: Path, expected: dict[str, dict], card: dict, report: VerifyReport) -> None:
    seen = set()
    # a selection shares its parent's shards, which hold unselected samples too; a repacked one has its own
    subset = "selection" in card and not card["selection"].get("repacked")
    text = card.get("encoders", {}).get("text", {})
    try:
        for sample in iter_shards([path]):
            seen.add(sample.key)
            report.checked["samples"] += 1
            row = expected.get(sample.key)
            if row is None:
                if not subset:
                    report.problems.append(f"{name}: sample {sample.key} is not in the manifest")
                continue
            if list(sample.latent.shape) != list(row["latent_shape"]):
                report.problems.append(f"{name}/{sample.key}: latent {list(sample.latent.shape)}, "
                                       f"manifest says {row['latent_shape']}")
            if text and sample.text.shape != (text.get("max_len"), text.get("dim")):
                report.problems.append(f"{name}/{sample.key}: text {sample.text.shape}, card says "
                                       f"({text.get('max_len')}, {text.get('dim')})")
            if sample.caption != row["caption"]:
                report.problems.append(f"{name}/{sample.key}: caption differs from the manifest")
    except (ShardFormatError, OSError, ValueError) as e:  # a truncated or hostile tar ends the read here
        report.problems.append(f"{name}: unreadable ({type(e).__name__}: {e})")
    for key in sorted(set(expected) - seen):
        report.problems.append(f"{name}: manifest sample {key} is missing from the shard")


def verify_lineage(lineage: dict) -> VerifyReport:
    """Check that every shard a training stage read is still where it was, byte for byte: `lineage` is the
    stage's lineage.json (beside its exported weights and in its MLflow run: each dataset's id and path, and the
    shards the stage's selection used, with their sha256).

    A dataset grown since (incremental curation keeps finished shards as they were, so its id changes while the
    stage's shards stay) passes with a note; a shard missing, or changed (curated again into the same
    directory, or damaged), is a problem: that model's training data can no longer be read back as it was."""
    report = VerifyReport(f"lineage of stage {lineage.get('stage', '?')}")
    for entry in lineage.get("datasets", []):
        root = storage.as_location(entry["path"])
        try:
            now = json.loads(storage.read_text(storage.join(root, mf.CARD))).get("id")
        except (OSError, ValueError):
            now = None
        if now is None:
            report.notes.append(f"{root}: no readable {mf.CARD} (the dataset directory moved or was removed?)")
        elif now != entry["id"]:
            report.notes.append(f"{root} is now dataset {now}; the stage read {entry['id']} (grown or curated "
                                "again since): checking the shards it read")
        for shard in entry.get("shards", []):
            name = shard["name"]
            try:
                path = mf.Dataset(root).shard_path(name)
            except ValueError as e:
                report.problems.append(str(e))
                continue
            with storage.local_copy(path) as local:
                if not local.is_file():
                    report.problems.append(f"{entry['id']}: shard {name} is missing from {root}")
                    continue
                report.checked["shards"] += 1
                digest = sha256_file(local)
            if digest != shard["sha256"]:
                report.problems.append(f"{entry['id']}: shard {name} changed since the stage read it (sha256 "
                                       f"{digest[:12]}..., recorded {str(shard['sha256'])[:12]}...)")
        report.checked["datasets"] += 1
    return report
