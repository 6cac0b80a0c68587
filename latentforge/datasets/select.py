"""`select`: a child dataset chosen from a parent's manifest alone (no decoding, no re-encoding).

The child lists the selected rows, records every other parent row in its rejects table as `not_selected`,
hard-links (or copies) the shards that hold its samples, and names its parent in the card's lineage. Either
dataset may be at a URI (s3://...): shards are then copied (server-side within one object store), and the card,
which marks a complete dataset, is uploaded last.

With `repack`, the child's shards are written anew instead, holding only the selected samples, packed in the
parent's order into tars of up to `shard_mb`: each sample's members are copied byte for byte (nothing decoded
or encoded again), from parent shards checked against the parent card's sha256 as they are read. For a selection
that keeps a small part of a corpus (a loader would otherwise read every parent shard for a few samples each),
and to compact a dataset grown by many small incremental curations into full shards (`where` left out).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from latentforge.datasets import manifest as mf
from latentforge.datasets import storage
from latentforge.datasets.shards import LatentShardWriter, sha256_file

MODALITIES = ("image", "video", "audio")  # what a manifest row's `modality` can be


def _link(src: Path | str, dst: Path | str) -> None:
    """A parent shard into the child: hard-linked on one local filesystem (no bytes copied), copied server-side
    within one object store, else downloaded or uploaded."""
    if not storage.is_remote(src) and not storage.is_remote(dst):
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    elif not storage.is_remote(dst):
        storage.download(src, dst)
    elif not storage.is_remote(src):
        storage.upload(src, dst)
    elif storage.scheme_of(src) == storage.scheme_of(dst):
        fs, path = storage.resolve(src)
        fs.copy_file(path, storage.resolve(dst)[1])
    else:
        with storage.local_copy(src) as local:
            storage.upload(local, dst)


def _not_selected(table: pa.Table, where: str) -> pa.Table:
    """The child's rejects: the parent's rows left out, `filtered` by stage `select`, built column by column (a
    dict per row cost gigabytes when a small selection leaves millions out)."""
    n = table.num_rows
    constant = {"status": "filtered", "stage": "select", "reason": "not_selected",
                "message": f"not selected by: {where}"}
    columns = []
    for field in mf.REJECTS_SCHEMA:
        if field.name in constant:
            columns.append(pa.repeat(pa.scalar(constant[field.name], field.type), n))
        elif field.name in table.column_names and field.name != "duplicate_of":
            columns.append(table[field.name].cast(field.type))
        else:
            columns.append(pa.nulls(n, field.type))
    out = pa.Table.from_arrays(columns, schema=mf.REJECTS_SCHEMA)
    return out.sort_by("id") if n else out


def _counts(column) -> dict:
    """{value: rows} in order of first appearance (as Counter over the rows gave)."""
    counted = pc.value_counts(column).to_pylist()
    return {c["values"]: c["counts"] for c in counted}


def select_dataset(parent_dir: str | Path, out_dir: str | Path, where: str | None,
                   modalities: list[str] | None = None, repack: bool = False, shard_mb: float | None = None,
                   progress: Callable[[int, int], None] | None = None) -> dict:
    """Write the child dataset to `out_dir`; returns its card. `repack`: write the selected samples into new
    shards of up to `shard_mb` (default: the parent curation's max_shard_mb, else 256) instead of linking the
    parent's; `progress(done, total)` is told the bytes of parent shards read so far, of all it will read."""
    parent = mf.Dataset(parent_dir)
    out = storage.as_location(out_dir)
    remote = storage.is_remote(out)
    if storage.list_files(out) if remote else (out.exists() and any(out.iterdir())):
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
    everything = parent.manifest()
    others = everything.filter(pc.invert(pc.is_in(everything["id"], value_set=chosen["id"].combine_chunks())))
    counts = Counter(chosen["shard"].to_pylist())
    listed = _check_shards(parent, card, counts)
    # Written under a name of its own and renamed when whole (to a URI: uploaded, the card last), so a parent
    # shard found damaged half-way leaves no child that looks finished.
    if remote:
        staging = Path(tempfile.mkdtemp(prefix="lf-select-", dir=storage.scratch_dir()))
    else:
        staging = out.with_name(f".{out.name}.{os.getpid()}.partial")
        shutil.rmtree(staging, ignore_errors=True)
    try:
        if repack:
            limit = shard_mb or (card.get("config") or {}).get("max_shard_mb") or 256.0
            placed, shards = _repack(parent, card, chosen, staging / mf.SHARDS, int(limit * 2**20), listed,
                                     progress)
            chosen = chosen.set_column(chosen.schema.get_field_index("shard"), "shard",
                                       pa.array([placed[i] for i in chosen["id"].to_pylist()], pa.string()))
        else:
            shards = [{**s, "count": counts[s["name"]], "total": s.get("total", s["count"])}
                      for s in card["shards"] if s["name"] in counts]
            for s in shards:
                _link(parent.shard_path(s["name"]), storage.join(out if remote else staging, mf.SHARDS, s["name"]))
        child = _write_child(staging, card, chosen, others, shards, where, modalities, repacked=repack)
        if remote:
            if repack:
                storage.upload(staging / mf.SHARDS, storage.join(out, mf.SHARDS))
            for name in (mf.MANIFEST, mf.REJECTS, mf.CARD):  # the card last: it marks a complete dataset
                storage.upload(staging / name, storage.join(out, name))
        else:
            if out.exists():
                out.rmdir()  # empty, checked above
            staging.rename(out)
    except BaseException:
        if remote:  # what reached the URI (it was empty): no shards left there without a card
            for name in storage.list_files(out):
                storage.remove(storage.join(out, name))
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return child


def _check_shards(parent: mf.Dataset, card: dict, counts: Counter) -> dict[str, tuple[int, int | None]]:
    """Every shard the selection needs is one the card lists and the parent still has (from one listing of its
    shard directory, returned), before anything is written: a shard gone is named, not met half-way as the
    OSError of a copy."""
    unlisted = sorted(set(counts) - {entry["name"] for entry in card["shards"]})
    if unlisted:
        raise ValueError(f"the manifest places samples in shards the card does not list: {', '.join(unlisted[:5])}"
                         f"{' ...' if len(unlisted) > 5 else ''}")
    listed = storage.file_infos(storage.join(parent.root, mf.SHARDS))
    gone = sorted(set(counts) - set(listed))
    if gone:
        raise ValueError(f"{len(gone)} shards holding selected samples are missing from {parent.root}: "
                         f"{', '.join(gone[:5])}{' ...' if len(gone) > 5 else ''} (run `latentforge verify` on it)")
    return listed


def _write_child(out: Path, card: dict, chosen: pa.Table, others: pa.Table, shards: list[dict], where: str | None,
                 modalities, repacked: bool = False) -> dict:
    mf.write_table(chosen.sort_by("id"), out / mf.MANIFEST)
    mf.write_table(_not_selected(others, where or str(modalities)), out / mf.REJECTS)
    child = _child_card(card, chosen, shards, where, modalities, repacked)
    (out / mf.CARD).write_text(json.dumps(child, indent=2, sort_keys=True))
    return child


def _child_card(card: dict, chosen: pa.Table, shards: list[dict], where: str | None, modalities,
                repacked: bool = False) -> dict:
    digest = hashlib.sha256(f"{card.get('id')}|{where}|{modalities}".encode())
    for s in shards:
        digest.update(f"{s['name']}:{s['sha256']}:{s['count']}".encode())
    return {
        **card,
        "id": f"{card.get('name', 'dataset')}-sel-{digest.hexdigest()[:12]}",
        "num_samples": chosen.num_rows,
        "modalities": _counts(chosen["modality"]),
        "buckets": dict(sorted(_counts(chosen["bucket"]).items())),
        "shards": shards,
        "parents": [card.get("id")],
        # Latent statistics stay the parent's: normalisation must match the data the parent was trained on.
        "selection": {"parent": card.get("id"), "where": where, "modalities": modalities,
                      **({"repacked": True} if repacked else {})},
    }


class _Sha256Reader:
    """A file read through once, hashed as it goes (the parent shard is checked on the read that copies it); an
    object at a URI streams in the same way."""

    def __init__(self, path: Path | str):
        self._file = storage.open_input(path)
        self.hash = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self.hash.update(data)
        return data

    def finish(self) -> str:
        while self.read(2**20):
            pass
        self._file.close()
        return self.hash.hexdigest()


def _samples(path: Path | str, reader: _Sha256Reader) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, members) of each sample of a shard tar, in order, as stored. webdataset's grouping rule (the key is
    the member name up to its first dot), on tarfile's stream reader: webdataset's own iterator decodes nothing
    either, but opens the file itself, and the bytes read here are the ones hashed."""
    key, members = None, {}
    try:
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                name_key, _, member = info.name.partition(".")
                if name_key != key and members:
                    yield key, members
                    members = {}
                key = name_key
                members[member] = tar.extractfile(info).read()
    except tarfile.TarError as e:
        raise ValueError(f"shard {storage.name_of(path)} cannot be read ({e}): run `latentforge verify` on the "
                         "parent") from e
    if members:
        yield key, members


def _repack(parent: mf.Dataset, card: dict, chosen: pa.Table, shard_dir: Path, max_bytes: int,
            listed: dict[str, tuple[int, int | None]], progress: Callable[[int, int], None] | None
            ) -> tuple[dict[str, str], list[dict]]:
    """Copy the `chosen` samples into new tars under `shard_dir`: id -> new shard name, and the card's entries.
    `listed`: the parent's shard files (name -> (size, mtime)), from one listing, for the progress total."""
    wanted: dict[str, set[str]] = {}
    for sample_id, shard in zip(chosen["id"].to_pylist(), chosen["shard"].to_pylist()):
        wanted.setdefault(shard, set()).add(sample_id)
    todo = [(entry, parent.shard_path(entry["name"])) for entry in card["shards"] if entry["name"] in wanted]
    sizes = {entry["name"]: listed[entry["name"]][0] for entry, _ in todo}
    total, done = sum(sizes.values()), 0
    placed: dict[str, str] = {}
    writer, size = None, 0

    def close() -> None:
        if writer is not None:
            writer.close()

    try:
        for entry, path in todo:
            keys = wanted[entry["name"]]
            reader = _Sha256Reader(path)
            found = set()
            for key, members in _samples(path, reader):
                if key not in keys:
                    continue
                nbytes = sum(len(v) for v in members.values()) + 512 * (len(members) + 1)  # tar headers
                if writer is not None and size + nbytes > max_bytes:
                    close()
                    writer, size = None, 0
                if writer is None:
                    writer = LatentShardWriter(shard_dir / f"shard-{len(set(placed.values())):06d}-00.tar")
                writer.write(key, members)  # refuses a sample with missing or unknown members
                placed[key] = writer.path.name
                found.add(key)
                size += nbytes
            digest = reader.finish()
            if digest != entry["sha256"]:
                raise ValueError(f"shard {entry['name']} has sha256 {digest[:12]}..., not the "
                                 f"{entry['sha256'][:12]}... its card records (changed since it was written): run "
                                 "`latentforge verify` on the parent")
            if found != keys:
                missing = sorted(keys - found)
                raise ValueError(f"shard {entry['name']} lacks {len(missing)} samples its manifest places there: "
                                 f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
            done += sizes[entry["name"]]
            if progress is not None:
                progress(done, total)
        close()
        writer = None
    finally:
        if writer is not None:  # an error half-way: the tar being written is dropped, not left partial
            writer.__exit__(RuntimeError, None, None)
    counts = Counter(placed.values())
    shards = [{"name": name, "sha256": sha256_file(shard_dir / name), "count": counts[name]}
              for name in sorted(counts)]
    return placed, shards
