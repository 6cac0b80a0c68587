"""storage.py against a real S3-compatible server (moto_server on loopback), and on the local filesystem."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from latentforge.datasets import storage


@pytest.fixture(autouse=True)
def _no_active_config():
    storage.configure(None)
    yield
    storage.configure(None)


def test_locations_keep_uris_and_make_paths(tmp_path):
    assert storage.as_location("s3://b/k/x.tar") == "s3://b/k/x.tar"
    assert storage.as_location(Path("s3://b/k")) == "s3://b/k"  # what Path() did to a URI is undone
    assert storage.as_location("rel/dir") == Path("rel/dir")
    assert storage.as_location("file:///tmp/x") == Path("/tmp/x")
    assert storage.join("s3://b/ds/", "shards", "a.tar") == "s3://b/ds/shards/a.tar"
    assert storage.join(tmp_path, "shards") == tmp_path / "shards"
    assert storage.with_suffix("s3://b/d/clip.mp4", ".txt") == "s3://b/d/clip.txt"
    assert storage.is_remote("s3://b/k") and not storage.is_remote(tmp_path) and not storage.is_remote("a/b")
    assert storage.ray_remote_args(tmp_path, None) == {}


def test_resolve_points_s3_at_the_configured_endpoint(s3_server, tmp_path):
    fs, path = storage.resolve("s3://bucket/some/key")
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/some/key"
    assert fs.region == "us-east-1"
    local_fs, local = storage.resolve(tmp_path / "x")
    assert isinstance(local_fs, pafs.LocalFileSystem) and local == str((tmp_path / "x").resolve())
    storage.configure(storage.StorageConfig(endpoint_url="http://127.0.0.1:1", region="eu-west-1"))
    other, _ = storage.resolve("s3://bucket/k")
    assert other is not fs and other.region == "eu-west-1"  # the active config wins over the environment


def test_write_read_list_and_hash_objects(s3_bucket):
    base = f"s3://{s3_bucket}/data"
    storage.write_text(f"{base}/a/one.txt", "hello")
    storage.write_bytes(f"{base}/a/b/two.bin", b"\x00" * 3000)
    storage.write_bytes(f"{base}/three.bin", b"xyz")
    assert storage.read_text(f"{base}/a/one.txt") == "hello"
    assert storage.list_files(base) == ["a/b/two.bin", "a/one.txt", "three.bin"]
    assert storage.list_files(f"s3://{s3_bucket}/absent") == []
    assert storage.exists(f"{base}/three.bin") and not storage.exists(f"{base}/nope.bin")
    assert storage.is_file(f"{base}/a/one.txt") and not storage.is_file(f"{base}/a")
    assert storage.size_of(f"{base}/a/b/two.bin") == 3000
    import hashlib

    assert storage.sha256(f"{base}/three.bin") == hashlib.sha256(b"xyz").hexdigest()
    with pytest.raises(FileNotFoundError):
        storage.size_of(f"{base}/nope.bin")


def test_upload_a_tree_and_download_it_back(s3_bucket, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("A")
    (src / "sub" / "b.npy").write_bytes(os.urandom(70_000))
    storage.upload(src, f"s3://{s3_bucket}/tree")
    assert storage.list_files(f"s3://{s3_bucket}/tree") == ["a.txt", "sub/b.npy"]
    back = storage.download(f"s3://{s3_bucket}/tree", tmp_path / "back")
    assert (back / "a.txt").read_text() == "A"
    assert (back / "sub" / "b.npy").read_bytes() == (src / "sub" / "b.npy").read_bytes()
    storage.upload(src / "a.txt", f"s3://{s3_bucket}/single/a.txt")
    assert storage.read_text(f"s3://{s3_bucket}/single/a.txt") == "A"


def test_local_copy_is_named_like_the_object_and_removed_after(s3_bucket):
    uri = f"s3://{s3_bucket}/media/clip.wav"
    storage.write_bytes(uri, b"RIFF....")
    with storage.local_copy(uri) as path:
        assert path.name == "clip.wav" and path.read_bytes() == b"RIFF...."
    assert not path.exists() and not path.parent.exists()
    with storage.local_copy(f"s3://{s3_bucket}/media/missing.txt") as missing:
        assert missing.name == "missing.txt" and not missing.exists()


def test_fetch_caches_until_the_object_changes(s3_bucket, tmp_path):
    storage.configure(storage.StorageConfig(cache_dir=tmp_path / "cache"))
    uri = f"s3://{s3_bucket}/shards/shard-000000-00.tar"
    storage.write_bytes(uri, b"first version")
    first = storage.fetch(uri)
    assert first.is_relative_to(tmp_path / "cache") and first.read_bytes() == b"first version"
    stamp = first.stat().st_mtime_ns
    assert storage.fetch(uri) == first and first.stat().st_mtime_ns == stamp  # served from the cache
    storage.write_bytes(uri, b"second, longer version")
    second = storage.fetch(uri)
    assert second != first and second.read_bytes() == b"second, longer version"
    with storage.open_shard(uri) as f:
        assert f.read() == b"second, longer version"
    with pytest.raises(FileNotFoundError):
        storage.fetch(f"s3://{s3_bucket}/shards/none.tar")


def test_a_fresh_process_reads_with_only_the_worker_environment(s3_bucket, s3_server):
    """What a Ray worker started before the settings existed gets through its runtime_env."""
    uri = f"s3://{s3_bucket}/w/x.txt"
    storage.write_text(uri, "from the driver")
    storage.configure(storage.StorageConfig(endpoint_url=s3_server.endpoint_url))
    env = storage.worker_env()
    assert env["AWS_ENDPOINT_URL_S3"] == s3_server.endpoint_url and env["AWS_ACCESS_KEY_ID"]
    assert storage.ray_remote_args(uri) == {"runtime_env": {"env_vars": env}}
    bare = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    code = f"from latentforge.datasets import storage; print(storage.read_text({uri!r}))"
    out = subprocess.run([sys.executable, "-c", code], env={**bare, **env}, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "from the driver"


def test_train_storage_splits_a_uri_into_path_and_filesystem(s3_server, tmp_path):
    path, fs = storage.train_storage("s3://bucket/runs")
    assert path == "bucket/runs" and isinstance(fs, pafs.S3FileSystem)
    local, none = storage.train_storage(tmp_path / "ckpt")
    assert local == str((tmp_path / "ckpt").resolve()) and none is None
