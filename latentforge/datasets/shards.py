"""Latent shards: WebDataset tars whose members are npy / txt / json only (never pickle).

Per sample `KEY.latent.npy`, `KEY.text.npy`, `KEY.text_mask.npy`, `KEY.caption.txt`, `KEY.meta.json`, and
optionally `KEY.repa.npy` (float16 (N, D) encoder features for a representation-alignment loss).
WebDataset splits a member name at the first dot, so keys must not contain one.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MEMBERS = ("latent.npy", "text.npy", "text_mask.npy", "caption.txt", "meta.json")
OPTIONAL_MEMBERS = ("repa.npy",)


class ShardFormatError(ValueError):
    """A shard member that is missing, unsafe or not what the format says."""


@dataclass
class LatentSample:
    key: str
    latent: np.ndarray  # float32 (C, T, H, W)
    text: np.ndarray  # float32 (L, D) token embeddings, padded
    text_mask: np.ndarray  # bool (L,)
    caption: str
    meta: dict
    repa: np.ndarray | None = None  # float16 (N, D) REPA target features, when the dataset has them


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


# numpy parses an npy header with `ast.literal_eval`. On CPython 3.11 the AST constructor's recursion counter is
# shared by the whole process, so two threads building ASTs at once (a garbage collection running a `__del__`
# mid-parse is enough to switch threads) fail with "SystemError: AST constructor recursion depth mismatch"
# (python/cpython#106905); the driver's shard-writer threads load npy members side by side and hit it in CI.
# Every npy header parse of this package (load_npy, training.shard_reader.NpyDecoder) holds this lock.
NPY_HEADER_LOCK = threading.Lock()


def load_npy(data: bytes) -> np.ndarray:
    with NPY_HEADER_LOCK:
        return np.load(io.BytesIO(data), allow_pickle=False)


def check_key(key: str) -> str:
    if not key or "." in key or "/" in key:
        raise ShardFormatError(f"sample key {key!r} must be non-empty without '.' or '/'")
    return key


def partial_path(path: Path) -> Path:
    """Where a writer of `path` writes before it replaces `path` with the finished file: a name of its own per
    process and thread, so a worker of a killed job still finishing a file while a rerun writes it again never
    interleaves with it (each replaces the file with the same, complete bytes)."""
    return path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.partial")


class LatentShardWriter:
    """Writes one tar of latent samples; a context manager. Member bytes are given already encoded."""

    def __init__(self, path: str | Path):
        import webdataset as wds

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = partial_path(self.path)
        self._stream = open(self._tmp, "wb")
        # encoder=False: members are written as the bytes we give, so webdataset never picks a pickling encoder.
        self._tar = wds.TarWriter(self._stream, encoder=False, mtime=0.0)
        self.count = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        missing = set(MEMBERS) - set(members)
        if missing:
            raise ShardFormatError(f"sample {key}: missing members {sorted(missing)}")
        unknown = set(members) - set(MEMBERS) - set(OPTIONAL_MEMBERS)
        if unknown:
            raise ShardFormatError(f"sample {key}: unexpected members {sorted(unknown)}")
        names = MEMBERS + tuple(n for n in OPTIONAL_MEMBERS if n in members)
        self._tar.write({"__key__": check_key(key), **{name: members[name] for name in names}})
        self.count += 1

    def write_sample(self, sample: LatentSample) -> None:
        self.write(sample.key, encode_members(sample))

    def close(self) -> None:
        self._tar.close()
        if not self._stream.closed:
            self._stream.flush()
            # On disk before it takes its name: after a power cut, the rename could otherwise survive and the
            # bytes not, leaving a short shard under a finished name (curation resume would catch it by its
            # sha256, a training run reading it would not).
            os.fsync(self._stream.fileno())
            self._stream.close()
        self._tmp.replace(self.path)  # a shard appears under its name only when complete

    def __enter__(self) -> LatentShardWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self._tar.close()
        finally:
            self._stream.close()
            self._tmp.unlink(missing_ok=True)


def encode_members(sample: LatentSample) -> dict[str, bytes]:
    return {
        "latent.npy": npy_bytes(sample.latent.astype(np.float32)),
        "text.npy": npy_bytes(sample.text.astype(np.float32)),
        "text_mask.npy": npy_bytes(sample.text_mask.astype(bool)),
        "caption.txt": sample.caption.encode("utf-8"),
        "meta.json": json.dumps(sample.meta, sort_keys=True).encode("utf-8"),
    } | ({} if sample.repa is None else {"repa.npy": npy_bytes(sample.repa.astype(np.float16))})


def decode_sample(raw: dict) -> LatentSample:
    """Decode one raw WebDataset sample dict by member name; unknown members are refused, not guessed at."""
    key = raw["__key__"]
    check_key(key)  # a member named ../x or /abs/x: never a path anything may be written to or read from
    names = {k for k in raw if not k.startswith("__")}
    unknown = names - set(MEMBERS) - set(OPTIONAL_MEMBERS)
    if unknown:
        raise ShardFormatError(f"sample {key}: unexpected members {sorted(unknown)} "
                               f"(only {MEMBERS + OPTIONAL_MEMBERS} allowed)")
    missing = set(MEMBERS) - names
    if missing:
        raise ShardFormatError(f"sample {key}: missing members {sorted(missing)}")
    try:
        return LatentSample(
            key=key,
            latent=load_npy(raw["latent.npy"]),
            text=load_npy(raw["text.npy"]),
            text_mask=load_npy(raw["text_mask.npy"]).astype(bool),
            caption=raw["caption.txt"].decode("utf-8"),
            meta=json.loads(raw["meta.json"]),
            repa=load_npy(raw["repa.npy"]) if "repa.npy" in raw else None,
        )
    except (ValueError, UnicodeDecodeError) as e:
        raise ShardFormatError(f"sample {key}: {e}") from e


def iter_shards(paths: Iterable[str | Path]) -> Iterator[LatentSample]:
    """Read samples in order from local shard tars with webdataset's tar expansion (no .decode(): no pickle)."""
    import webdataset as wds

    urls = [str(p) for p in paths]
    if not urls:
        return
    # Splitting across ranks is done by the caller on sample keys, so webdataset must hand every shard over.
    dataset = wds.WebDataset(
        urls, shardshuffle=False, nodesplitter=_all_shards, workersplitter=_all_shards, empty_check=False
    )
    try:
        for raw in dataset:
            yield decode_sample(raw)
    except tarfile.TarError as e:  # truncated or corrupt tar: one clear error type for every reader
        raise ShardFormatError(f"corrupt or truncated shard: {e.args[0] if e.args else e}") from e


def _all_shards(src):
    yield from src


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
