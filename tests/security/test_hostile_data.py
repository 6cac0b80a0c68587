"""Hostile inputs are refused with a clear error, and nothing in them is ever unpickled or followed:
pickle members, object-dtype npy, tar member names that climb out (../) or are absolute, symlink members,
symlinks out of the input root, and manifests that name shards outside their dataset."""
from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from latentforge.datasets import manifest as mf
from latentforge.datasets.shards import LatentSample, ShardFormatError, encode_members, iter_shards
from latentforge.datasets.verify import verify_dataset
from latentforge.pipelines.discover import discover
from latentforge.training.shard_reader import NpyDecoder, iter_raw_samples


class Tripwire:
    """Unpickling this writes a file: if the file appears, something unpickled shard bytes."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (Path(self.path).write_text, ("unpickled!",))


def good_members(key: str = "s0001") -> dict[str, bytes]:
    sample = LatentSample(key, np.zeros((4, 1, 2, 2), np.float32), np.zeros((3, 8), np.float32),
                          np.ones(3, bool), "a caption", {"modality": "image"})
    return encode_members(sample)


def write_tar(path: Path, members: list[tuple[str, bytes]], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


def sample_members(key: str, extra: dict[str, bytes] | None = None, replace: dict[str, bytes] | None = None):
    members = {**good_members(key), **(replace or {})}
    return [(f"{key}.{m}", data) for m, data in {**members, **(extra or {})}.items()]


def read_all_ways(path: Path) -> list[Exception]:
    """Read with the general reader and the training reader (+ its npy decoder); the errors each raised."""
    errors = []
    try:
        list(iter_shards([path]))
    except ShardFormatError as e:
        errors.append(e)
    try:
        decode = NpyDecoder()
        for key, members in iter_raw_samples(str(path)):
            for name, data in members.items():
                if name.endswith(".npy"):
                    decode(data, f"{key}.{name}")
    except ShardFormatError as e:
        errors.append(e)
    return errors


@pytest.mark.parametrize("member", ["evil.pyd", "evil.pickle", "evil.pth"])
def test_a_pickle_member_is_refused_unread(tmp_path, member):
    wire = tmp_path / "tripwire"
    shard = write_tar(tmp_path / "shard.tar", sample_members("s0001", {member: pickle.dumps(Tripwire(wire))}))
    errors = read_all_ways(shard)
    assert len(errors) == 2 and all("unexpected member" in str(e) for e in errors), errors
    assert not wire.exists()


def test_an_object_dtype_npy_is_refused_unread(tmp_path):
    wire = tmp_path / "tripwire"
    buf = io.BytesIO()
    np.save(buf, np.array([Tripwire(wire)], dtype=object), allow_pickle=True)
    shard = write_tar(tmp_path / "shard.tar", sample_members("s0001", replace={"latent.npy": buf.getvalue()}))
    errors = read_all_ways(shard)
    assert len(errors) == 2, errors
    assert "pickle" in str(errors[0]).lower() and "object arrays are refused" in str(errors[1])
    assert not wire.exists()


@pytest.mark.parametrize("key", ["../escape", "/etc/escape", "sub/../../escape"])
def test_member_names_that_leave_the_shard_are_refused(tmp_path, key):
    shard = write_tar(tmp_path / "shard.tar", [(f"{key}.{m}", d) for m, d in good_members("s0001").items()])
    with pytest.raises(ShardFormatError, match="must be non-empty without '.' or '/'"):
        list(iter_shards([shard]))


def test_a_symlink_member_is_refused(tmp_path):
    members = [(n, d) for n, d in sample_members("s0001") if not n.endswith("caption.txt")]
    shard = write_tar(tmp_path / "shard.tar", members, links={"s0001.caption.txt": "/etc/passwd"})
    with pytest.raises(ShardFormatError, match="missing members|unsupported tar member type"):
        list(iter_shards([shard]))
    with pytest.raises(ShardFormatError, match="unsupported tar member type"):
        list(iter_raw_samples(str(shard)))


def test_verify_reports_a_hostile_shard(tmp_path):
    wire = tmp_path / "tripwire"
    root = tmp_path / "ds"
    (root / mf.SHARDS).mkdir(parents=True)
    shard = write_tar(root / mf.SHARDS / "shard-000000-00.tar",
                      sample_members("s0001", {"evil.pyd": pickle.dumps(Tripwire(wire))}))
    from latentforge.datasets.shards import sha256_file

    rows = [{"id": "s0001", "modality": "image", "latent_shape": [4, 1, 2, 2], "caption": "a caption",
             "shard": shard.name, "status": "ok"}]
    mf.write_table(mf.to_table(rows, mf.MANIFEST_SCHEMA), root / mf.MANIFEST)
    mf.write_table(mf.to_table([], mf.REJECTS_SCHEMA), root / mf.REJECTS)
    (root / mf.CARD).write_text(json.dumps({"id": "x", "name": "x", "num_samples": 1, "shards": [
        {"name": shard.name, "sha256": sha256_file(shard), "count": 1}]}))
    report = verify_dataset(root)
    assert not report.ok and any("unexpected member" in p for p in report.problems), report.problems
    assert not wire.exists()


@pytest.mark.parametrize("name", ["../../outside.tar", "/etc/passwd", "..", "sub/../../x.tar"])
def test_a_manifest_naming_shards_outside_its_dataset_is_refused(tmp_path, name):
    root = tmp_path / "ds"
    (root / mf.SHARDS).mkdir(parents=True)
    with pytest.raises(ValueError, match="outside"):
        mf.Dataset(root).shard_path(name)


def test_a_symlink_out_of_the_input_root_is_rejected_not_read(tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"not yours")
    root = tmp_path / "corpus"
    (root / "images").mkdir(parents=True)
    (root / "images" / "inside.png").write_bytes(b"x")
    os.symlink(outside, root / "images" / "link.png")
    os.symlink(tmp_path, root / "images" / "dirlink")  # a linked directory is not walked into
    rows = {r["relpath"]: r for r in discover(root, samples_per_shard=8)}
    assert set(rows) == {"images/inside.png", "images/link.png"}
    assert rows["images/link.png"]["status"] == "rejected" and rows["images/link.png"]["reason"] == "outside_root"
    assert rows["images/inside.png"]["status"] == "ok"


def test_training_reader_refuses_member_names_with_directories(tmp_path) -> None:
    """The training loader's lean tar reader: `../x.latent.npy` is hostile, not sample `x`."""
    import io
    import tarfile

    from latentforge.datasets.shards import ShardFormatError
    from latentforge.training.shard_reader import iter_raw_samples

    for name in ("../x.latent.npy", "/abs/x.latent.npy", "d/x.latent.npy"):
        path = tmp_path / "shard-000000-00.tar"
        with tarfile.open(path, "w") as tar:
            data = b"\x93NUMPY"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        with pytest.raises(ShardFormatError, match="no directories"):
            list(iter_raw_samples(str(path)))
