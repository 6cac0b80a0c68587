"""`select`: a child dataset chosen from a parent's manifest alone (no decoding, no re-encoding).

The child lists the selected rows, records every other parent row in its rejects table as `not_selected`,
hard-links (or copies) the shards that hold its samples, and names its parent in the card's lineage.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa

from latentforge.datasets import manifest as mf

MODALITIES = ("image", "video", "audio")  # what a manifest row's `modality` can be


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # same filesystem: no bytes copied, and the checksum stays the parent's
    except OSError:
        shutil.copy2(src, dst)


def _not_selected(table: pa.Table, where: str) -> list[dict]:
    return [{"id": r["id"], "source_id": r["source_id"], "uri": r["uri"], "relpath": r["relpath"],
             "modality": r["modality"], "status": "filtered", "stage": "select", "reason": "not_selected",
             "message": f"not selected by: {where}"} for r in table.to_pylist()]


def select_dataset(parent_dir: str | Path, out_dir: str | Path, where: str | None,
                   modalities: list[str] | None = None) -> dict:
    """Write the child dataset to `out_dir`; returns its card."""
    parent = mf.Dataset(Path(parent_dir))
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    card = parent.card
    unknown = [m for m in modalities or () if m not in MODALITIES]
    if unknown:
        raise ValueError(f"unknown modality {', '.join(map(repr, unknown))}: expected {', '.join(MODALITIES)} "
                         f"({parent.root} holds {', '.join(sorted(card.get('modalities') or {})) or 'none'})")
    chosen = parent.select(where, modalities)
    if chosen.num_rows == 0:
        asked = ([repr(where)] if where else []) + ([f"modality {', '.join(modalities)}"] if modalities else [])
        raise ValueError(f"selection {' and '.join(asked) or '(all)'} matches no sample of {parent.root}")
    ids = set(chosen["id"].to_pylist())
    everything = parent.manifest()
    others = everything.filter(pa.array([i not in ids for i in everything["id"].to_pylist()]))
    counts = Counter(chosen["shard"].to_pylist())
    shards = [{**s, "count": counts[s["name"]], "total": s.get("total", s["count"])}
              for s in card["shards"] if s["name"] in counts]
    for s in shards:
        _link(parent.shard_path(s["name"]), out / mf.SHARDS / s["name"])
    mf.write_table(chosen.sort_by("id"), out / mf.MANIFEST)
    mf.write_table(mf.to_table(_not_selected(others, where or str(modalities)), mf.REJECTS_SCHEMA), out / mf.REJECTS)
    child = _child_card(card, chosen, shards, where, modalities)
    (out / mf.CARD).write_text(json.dumps(child, indent=2, sort_keys=True))
    return child


def _child_card(card: dict, chosen: pa.Table, shards: list[dict], where: str | None, modalities) -> dict:
    rows = chosen.to_pylist()
    digest = hashlib.sha256(f"{card.get('id')}|{where}|{modalities}".encode())
    for s in shards:
        digest.update(f"{s['name']}:{s['sha256']}:{s['count']}".encode())
    return {
        **card,
        "id": f"{card.get('name', 'dataset')}-sel-{digest.hexdigest()[:12]}",
        "num_samples": len(rows),
        "modalities": dict(Counter(r["modality"] for r in rows)),
        "buckets": dict(sorted(Counter(r["bucket"] for r in rows).items())),
        "shards": shards,
        "parents": [card.get("id")],
        # Latent statistics stay the parent's: normalisation must match the data the parent was trained on.
        "selection": {"parent": card.get("id"), "where": where, "modalities": modalities},
    }
