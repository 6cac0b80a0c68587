"""Latent shard tars: writer/reader symmetry, key rules, and refusal of anything that is not npy/txt/json."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from latentforge.datasets.shards import (
    MEMBERS,
    LatentSample,
    LatentShardWriter,
    ShardFormatError,
    decode_sample,
    encode_members,
    iter_shards,
    load_npy,
    npy_bytes,
    sha256_file,
)


def make_sample(key: str, seed: int, shape: tuple[int, ...] = (12, 1, 4, 4)) -> LatentSample:
    rng = np.random.default_rng(seed)
    mask = np.zeros(8, dtype=bool)
    mask[: 2 + seed % 5] = True
    return LatentSample(
        key=key,
        latent=rng.standard_normal(shape).astype(np.float32),
        text=rng.standard_normal((8, 6)).astype(np.float32),
        text_mask=mask,
        caption=f"sample {seed}: a caf\u00e9 \u2014 with unicode",
        meta={"modality": "image", "seed": seed, "nested": {"shape": list(shape), "fps": 8.5}},
    )


def assert_same_sample(got: LatentSample, want: LatentSample) -> None:
    assert got.key == want.key
    np.testing.assert_array_equal(got.latent, want.latent)
    assert got.latent.dtype == np.float32
    np.testing.assert_array_equal(got.text, want.text)
    np.testing.assert_array_equal(got.text_mask, want.text_mask)
    assert got.text_mask.dtype == np.bool_
    assert got.caption == want.caption
    assert got.meta == want.meta


class Payload:
    """Unpickling this creates `marker`: proof that a reader ran pickle on shard bytes."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def write_raw_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar written with the standard library, so it can hold members the shard writer would never write."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def sample_members(sample: LatentSample) -> list[tuple[str, bytes]]:
    return [(f"{sample.key}.{name}", data) for name, data in encode_members(sample).items()]


def test_round_trip_keeps_arrays_text_meta_and_order(tmp_path: Path) -> None:
    # Keys deliberately out of alphabetical order: the reader must keep write order, not sort.
    first = [make_sample("zeta", 0), make_sample("alpha", 1, (64, 5, 1, 1)), make_sample("m-id_3", 2)]
    second = [make_sample("beta", 3, (12, 4, 2, 2)), make_sample("aaa", 4)]
    paths = [tmp_path / "shards" / "shard-000001.tar", tmp_path / "shards" / "shard-000000.tar"]
    for path, samples in zip(paths, (first, second)):
        with LatentShardWriter(path) as writer:
            for sample in samples:
                writer.write_sample(sample)
        assert writer.count == len(samples)
        assert path.is_file()
    got = list(iter_shards(paths))
    assert [s.key for s in got] == ["zeta", "alpha", "m-id_3", "beta", "aaa"]
    for g, w in zip(got, first + second):
        assert_same_sample(g, w)


def test_tar_holds_exactly_the_format_members(tmp_path: Path) -> None:
    path = tmp_path / "s.tar"
    with LatentShardWriter(path) as writer:
        writer.write_sample(make_sample("k1", 1))
        writer.write_sample(make_sample("k2", 2))
    with tarfile.open(path) as tar:
        names = tar.getnames()
    # All of a sample's members sit together (WebDataset groups consecutive members by key).
    assert [n.split(".", 1)[0] for n in names] == ["k1"] * len(MEMBERS) + ["k2"] * len(MEMBERS)
    assert sorted(names) == sorted(f"{k}.{m}" for k in ("k1", "k2") for m in MEMBERS)


def test_writer_output_is_reproducible(tmp_path: Path) -> None:
    # mtime is fixed, so the same samples give byte-identical shards (stable checksums in the card).
    digests = []
    for name in ("a.tar", "b.tar"):
        with LatentShardWriter(tmp_path / name) as writer:
            writer.write_sample(make_sample("k", 7))
        digests.append(sha256_file(tmp_path / name))
    assert digests[0] == digests[1]


def test_iter_shards_of_nothing_yields_nothing() -> None:
    assert list(iter_shards([])) == []


@pytest.mark.parametrize("key", ["has.dot", "a/b", "", ".hidden"])
def test_bad_keys_are_refused_and_no_shard_appears(tmp_path: Path, key: str) -> None:
    path = tmp_path / "bad.tar"
    with pytest.raises(ShardFormatError, match="must be non-empty without"):
        with LatentShardWriter(path) as writer:
            writer.write_sample(make_sample("ok", 0))
            writer.write_sample(make_sample(key, 1))
    assert list(tmp_path.iterdir()) == []  # no shard, no temporary file left


def test_missing_member_is_refused_by_the_writer(tmp_path: Path) -> None:
    members = encode_members(make_sample("k", 0))
    del members["text_mask.npy"]
    with pytest.raises(ShardFormatError, match="text_mask.npy"):
        with LatentShardWriter(tmp_path / "m.tar") as writer:
            writer.write("k", members)
    assert list(tmp_path.iterdir()) == []


def test_exception_inside_with_removes_partial_and_creates_no_shard(tmp_path: Path) -> None:
    path = tmp_path / "out" / "shard-000000.tar"
    with pytest.raises(RuntimeError, match="boom"):
        with LatentShardWriter(path) as writer:
            writer.write_sample(make_sample("k", 0))
            (tmp,) = path.parent.iterdir()  # written under a temporary name of this writer's meanwhile
            assert tmp.name.startswith("shard-000000.tar.") and tmp.name.endswith(".partial")
            assert not path.exists()
            raise RuntimeError("boom")
    assert list(path.parent.iterdir()) == []


def _open_fds_to(target: Path) -> list[str]:
    fd_dir = Path("/proc/self/fd")
    links = []
    for fd in os.listdir(fd_dir):
        try:
            links.append(os.readlink(fd_dir / fd))
        except OSError:
            continue
    return [link for link in links if link.startswith(str(target))]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_exception_inside_with_leaves_no_open_file(tmp_path: Path) -> None:
    path = tmp_path / "shard.tar"
    with pytest.raises(RuntimeError):
        with LatentShardWriter(path) as writer:
            writer.write_sample(make_sample("k", 0))
            raise RuntimeError("boom")
    assert _open_fds_to(path) == []
    del writer


def test_extra_pickle_member_is_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled.marker"
    payload = pickle.dumps(Payload(marker))
    sample = make_sample("s1", 0)
    path = tmp_path / "evil.tar"
    write_raw_tar(path, sample_members(sample) + [("s1.obj.pyd", payload)])

    with pytest.raises(ShardFormatError, match=r"obj\.pyd"):
        list(iter_shards([path]))
    assert not marker.exists()

    raw = {"__key__": "s1", **encode_members(sample), "obj.pyd": payload}
    with pytest.raises(ShardFormatError, match=r"s1: unexpected members \['obj\.pyd'\]"):
        decode_sample(raw)
    assert not marker.exists()


def test_good_samples_before_a_bad_one_are_read_then_the_bad_one_stops_reading(tmp_path: Path) -> None:
    good = make_sample("good", 0)
    path = tmp_path / "mixed.tar"
    write_raw_tar(path, sample_members(good) + sample_members(make_sample("bad", 1)) + [("bad.x.pth", b"junk")])
    reader = iter_shards([path])
    assert_same_sample(next(reader), good)
    with pytest.raises(ShardFormatError, match=r"bad: unexpected members \['x\.pth'\]"):
        next(reader)


def test_object_array_npy_is_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled.marker"
    evil = np.empty(1, dtype=object)
    evil[0] = Payload(marker)
    buf = io.BytesIO()
    np.save(buf, evil, allow_pickle=True)
    members = encode_members(make_sample("s1", 0))
    members["latent.npy"] = buf.getvalue()
    path = tmp_path / "objarray.tar"
    write_raw_tar(path, [(f"s1.{name}", data) for name, data in members.items()])

    with pytest.raises(ShardFormatError, match="s1"):
        list(iter_shards([path]))
    assert not marker.exists()
    with pytest.raises(ValueError):
        load_npy(buf.getvalue())
    assert not marker.exists()


def test_missing_member_is_refused_by_the_reader(tmp_path: Path) -> None:
    path = tmp_path / "short.tar"
    members = [m for m in sample_members(make_sample("s1", 0)) if not m[0].endswith("meta.json")]
    write_raw_tar(path, members)
    with pytest.raises(ShardFormatError, match=r"missing members \['meta\.json'\]"):
        list(iter_shards([path]))


@pytest.mark.parametrize(
    "member, data",
    [("caption.txt", b"\xff\xfe not utf-8"), ("meta.json", b"{not json"), ("text.npy", b"not an npy file")],
)
def test_undecodable_member_becomes_a_format_error(member: str, data: bytes) -> None:
    raw = {"__key__": "s1", **encode_members(make_sample("s1", 0)), member: data}
    with pytest.raises(ShardFormatError, match="sample s1"):
        decode_sample(raw)


def test_npy_bytes_refuses_object_arrays() -> None:
    with pytest.raises(ValueError):
        npy_bytes(np.array([{"a": 1}], dtype=object))


def test_two_writers_of_the_same_shard_do_not_share_a_temporary_file(tmp_path: Path) -> None:
    """A worker of a killed job may still be writing a shard its rerun writes again: each writes a file of its
    own and the last to finish replaces the shard, whole."""
    import threading

    path = tmp_path / "shard-000001-00.tar"
    first = LatentShardWriter(path)
    first.write_sample(make_sample("a", 0))
    done = threading.Event()

    def second() -> None:
        with LatentShardWriter(path) as writer:
            writer.write_sample(make_sample("a", 0))
        done.set()

    thread = threading.Thread(target=second)
    thread.start()
    thread.join()
    assert done.is_set() and [s.key for s in iter_shards([path])] == ["a"]
    first.write_sample(make_sample("b", 1))
    first.close()
    assert [s.key for s in iter_shards([path])] == ["a", "b"] and list(tmp_path.iterdir()) == [path]


def test_npy_members_load_from_many_threads_at_once() -> None:
    """numpy parses npy headers with ast.literal_eval, whose recursion counter CPython 3.11 shares across
    threads: without NPY_HEADER_LOCK this fails within a fraction of a second ("AST constructor recursion
    depth mismatch"), as the driver's shard-writer threads did in CI. Garbage with a __del__ makes a
    collection switch threads in the middle of a parse; a tiny switch interval makes that likely."""
    import gc
    import sys
    import threading

    from latentforge.training.shard_reader import NpyDecoder

    data = npy_bytes(np.arange(32 * 384, dtype=np.float16).reshape(32, 384))
    errors: list[str] = []

    class Cycle:
        def __del__(self) -> None:
            [i for i in range(10)]

    def work() -> None:
        try:
            for _ in range(1500):
                if errors:
                    return
                assert load_npy(data).shape == (32, 384)
                assert NpyDecoder()(data).shape == (32, 384)  # a fresh decoder parses the header every time
                a, b = Cycle(), Cycle()
                a.other, b.other = b, a
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(repr(e))

    interval, thresholds = sys.getswitchinterval(), gc.get_threshold()
    sys.setswitchinterval(1e-6)
    gc.set_threshold(20, 2, 2)
    try:
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
        gc.set_threshold(*thresholds)
    assert errors == []
