"""The training read path of latent shards: a lean streaming tar reader and an npy decoder that parses each
distinct header once.

Why not webdataset's pipeline or `tarfile` here: profiling `bench/loader.py` showed most of the read time in
per-member overhead, not in bytes: tarfile builds a TarInfo (and parses a pax header: our writer emits one
per member for its float mtime), webdataset adds generator stages and dict building per sample, and
`np.load` parses every npy header with `ast.literal_eval`. A shard here is a plain ustar/pax stream written by
`LatentShardWriter`, so the reader below handles exactly that (regular files, pax `x`/`g`, GNU `L` long
names) and refuses anything else; the format's rules (npy/txt/json members only, no pickle) are enforced
by name before any member is decoded. `latentforge.datasets.shards.iter_shards` stays the general reader.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

import numpy as np

from latentforge.datasets import storage
from latentforge.datasets.shards import MEMBERS, NPY_HEADER_LOCK, OPTIONAL_MEMBERS, ShardFormatError

BLOCK = 512
ALLOWED = frozenset(MEMBERS + OPTIONAL_MEMBERS)
NPY_MAGIC = b"\x93NUMPY"


def open_shard(uri: str) -> BinaryIO:
    """The one place a shard is opened for training reads: a local path directly, a URI (s3://...) through
    the local shard cache of storage.open_shard."""
    return storage.open_shard(uri)


def _octal(field: bytes) -> int:
    if field[:1] == b"\x80":  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    field = field.rstrip(b"\x00 ").lstrip(b" ")
    return int(field, 8) if field else 0


def _pax_records(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= space - pos:  # a record that does not move on would loop for ever
            raise ValueError(f"pax record length {length}")
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8")] = value.decode("utf-8")
        pos += length
    return out


def _corrupt(uri: str, offset: int, e: ValueError) -> ShardFormatError:
    return ShardFormatError(f"{uri}: corrupt tar header at byte {offset}: {e}")


def iter_members(f: BinaryIO, uri: str, wanted=None) -> Iterator[tuple[str, memoryview | None]]:
    """(name, bytes) of each regular member in order; `wanted(name) -> bool` skips the others' bytes (None).
    A header that does not parse (bad number, name not UTF-8) is a ShardFormatError naming its byte offset."""
    long_name, pax, offset = None, {}, 0  # offset: of the current header in the shard
    while True:
        header = f.read(BLOCK)
        if len(header) < BLOCK:
            if not header:
                return  # tolerated: a stream cut exactly at a member boundary has no end blocks
            raise ShardFormatError(f"{uri}: truncated tar header at byte {offset}")
        if header[0] == 0 and header.count(0) == BLOCK:  # end-of-archive blocks
            return
        # The ustar magic instead of the header checksum: summing 512 bytes in Python cost more than the rest
        # of the header; shard bytes are covered by the card's sha256 (`latentforge verify`).
        if header[257:262] != b"ustar":
            raise ShardFormatError(f"{uri}: corrupt tar header at byte {offset} (no ustar magic)")
        kind = header[156:157]
        try:
            size = int(pax["size"]) if "size" in pax else _octal(header[124:136])
            if size < 0:
                raise ValueError(f"negative member size {size}")
        except ValueError as e:
            raise _corrupt(uri, offset, e) from e
        padded = -(-size // BLOCK) * BLOCK
        if kind in (b"x", b"g", b"L"):
            data = f.read(padded)[:size]
            if len(data) < size:
                raise ShardFormatError(f"{uri}: truncated tar member at byte {offset}")
            try:
                if kind == b"x":
                    pax = _pax_records(data)
                elif kind == b"L":
                    long_name = data.rstrip(b"\x00").decode("utf-8")
            except ValueError as e:  # UnicodeDecodeError included
                raise _corrupt(uri, offset, e) from e
            offset += BLOCK + padded
            continue
        if kind not in (b"0", b"\x00", b"5"):
            raise ShardFormatError(f"{uri}: unsupported tar member type {kind!r} at byte {offset}")
        name = pax.get("path") or long_name
        if name is None:
            try:
                name = header[:100].rstrip(b"\x00").decode("utf-8")
                prefix = header[345:500].rstrip(b"\x00")
                if prefix:
                    name = prefix.decode("utf-8") + "/" + name
            except UnicodeDecodeError as e:
                raise _corrupt(uri, offset, e) from e
        long_name, pax = None, {}
        offset += BLOCK + padded
        if kind == b"5":
            continue
        if wanted is None or wanted(name):
            data = f.read(padded)
            if len(data) < padded:
                raise ShardFormatError(f"{uri}: truncated tar member {name}")
            yield name, memoryview(data)[:size]  # a view: no copy of the member's bytes
        else:
            f.seek(padded, 1)
            yield name, None


def iter_raw_samples(uri: str, wanted_key=None) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """(key, {member: bytes}) per sample of a shard, in order; members of unwanted keys come back as None."""
    key, members = None, {}
    def wanted(name: str) -> bool:
        return wanted_key is None or wanted_key(name.split(".", 1)[0])

    with open_shard(uri) as f:
        for name, data in iter_members(f, uri, wanted):
            k, _, member = name.partition(".")
            if "/" in k or not k:  # our writer never writes directories: `../x`, `/abs/x` or `d/x` is hostile
                raise ShardFormatError(f"{uri}: member name {name!r} is not KEY.MEMBER (no directories allowed)")
            if member not in ALLOWED:
                raise ShardFormatError(f"{uri}: sample {k}: unexpected member {member!r} "
                                       f"(only {sorted(ALLOWED)} allowed)")
            if k != key and key is not None:
                yield key, members
                members = {}
            key = k
            members[member] = data
    if key is not None:
        yield key, members


class NpyDecoder:
    """npy bytes -> array view (no copy), parsing each distinct header (dtype, shape) once.

    Every sample of a bucket has the same latent header, so after the first sample a member costs a dict
    lookup and `np.frombuffer` instead of `np.load`'s header parse. Object dtypes are refused: no pickle.
    """

    def __init__(self):
        self._headers: dict[bytes, tuple[np.dtype, tuple[int, ...], int, int]] = {}

    def __call__(self, data: bytes | memoryview, what: str = "npy") -> np.ndarray:
        if data[:6] != NPY_MAGIC:
            raise ShardFormatError(f"{what}: not an npy member")
        if len(data) < 10 or data[6] != 1 and len(data) < 12:
            raise ShardFormatError(f"{what}: npy member of {len(data)} bytes is shorter than an npy header")
        if data[6] == 1:
            end = 10 + int.from_bytes(data[8:10], "little")
        else:
            end = 12 + int.from_bytes(data[8:12], "little")
        if len(data) < end:
            raise ShardFormatError(f"{what}: npy header of {end} bytes but the member has {len(data)}")
        parsed = self._headers.get(data[6:end])
        if parsed is None:
            parsed = self._parse(bytes(data[:end]), end, what)
            self._headers[bytes(data[6:end])] = parsed
        dtype, shape, offset, count = parsed
        if len(data) - offset < count * dtype.itemsize:
            raise ShardFormatError(f"{what}: npy data shorter than its header says")
        return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)

    @staticmethod
    def _parse(data: bytes, end: int, what: str) -> tuple[np.dtype, tuple[int, ...], int, int]:
        import io

        from numpy.lib import format as npy_format

        stream = io.BytesIO(data[:end])
        try:
            version = npy_format.read_magic(stream)
            read = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}.get(version)
            if read is None:
                raise ValueError(f"npy format version {version} is not supported")
            with NPY_HEADER_LOCK:  # literal_eval: see NPY_HEADER_LOCK
                shape, fortran, dtype = read(stream, max_header_size=1 << 16)  # the header parse np.load does
        except ValueError as e:
            raise ShardFormatError(f"{what}: {e}") from e
        if any(n < 0 for n in shape):
            raise ShardFormatError(f"{what}: negative npy shape {shape}")
        if dtype.hasobject:
            raise ShardFormatError(f"{what}: object arrays are refused (they would need pickle)")
        if fortran and len(shape) > 1:
            raise ShardFormatError(f"{what}: Fortran-ordered npy is not written by LatentShardWriter")
        return dtype, tuple(shape), end, int(np.prod(shape, dtype=np.int64))
