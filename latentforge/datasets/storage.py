"""Where data lives: a local path or a URI (s3://, gs://, hdfs://, or any scheme fsspec knows), resolved to a
pyarrow FileSystem and a path inside it.

pyarrow.fs does the work (S3 with an endpoint override for MinIO / Ceph / moto, GCS, HDFS, `copy_files`);
fsspec is only the fallback for schemes pyarrow has no native filesystem for, wrapped so callers still see a
pyarrow FileSystem. Ray Data and Ray Train take the same pyarrow filesystems (`storage_filesystem=`).

Settings: a `StorageConfig` (the root config's `storage` section) made active in the driver with
`configure`, else the standard AWS environment (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_REGION, the
credential variables), read when a filesystem is first needed, never at import. Ray workers get the
driver's settings as environment variables (`worker_env`) through a runtime_env: credentials are never
written into a config, a manifest or a card.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, BinaryIO
from urllib.parse import urlparse

import pyarrow.fs as pafs
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

ANONYMOUS_ENV = "LATENTFORGE_S3_ANONYMOUS"
CACHE_ENV = "LATENTFORGE_CACHE_DIR"
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                  "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_EC2_METADATA_DISABLED")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# pathlib collapses "s3://b/k" to "s3:/b/k"; a URI that went through Path() is recognised and restored.
_MANGLED = re.compile(r"^(s3|s3a|gs|gcs|hdfs|viewfs|abfs|abfss|az|memory):/(?!/)")


class StorageConfig(BaseModel):
    """Object-store settings; every field defaults to the standard AWS environment variable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str | None = Field(None, description=(
        "S3-compatible endpoint, e.g. http://127.0.0.1:9000 (MinIO, Ceph, moto); "
        "default AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL, else AWS"))
    region: str | None = Field(None, description="S3 region; default AWS_REGION, then AWS_DEFAULT_REGION")
    anonymous: bool = Field(False, description="unsigned requests (public buckets); no credentials are looked up")
    cache_dir: Path | None = Field(None, description=(
        "local cache of shards read for training and scratch for staged inputs; default TMPDIR/latentforge-cache"))
    checkpoint_uri: str | None = Field(None, description=(
        "Ray Train storage_path (checkpoints), a local dir or s3://bucket/prefix; default WORKDIR/checkpoints"))


_active: StorageConfig | None = None


def configure(cfg: StorageConfig | None) -> None:
    """Make `cfg` this process's storage settings (the driver does this once; workers use `worker_env`)."""
    global _active
    _active = cfg


def active() -> StorageConfig:
    return _active if _active is not None else StorageConfig()


# --- locations ------------------------------------------------------------------------------------------
def scheme_of(location: str | Path) -> str:
    match = _SCHEME.match(str(location)) if not isinstance(location, Path) else None
    return match.group(1).lower() if match else ""


def is_remote(location: str | Path | None) -> bool:
    return location is not None and scheme_of(as_location(location)) not in ("", "file")


def as_location(value: str | Path) -> str | Path:
    """A URI stays a string (Path() would collapse its '//'); anything else becomes a Path."""
    if isinstance(value, Path):
        text = value.as_posix()
        return _MANGLED.sub(r"\1://", text) if _MANGLED.match(text) else value
    if _SCHEME.match(value) and not value.startswith("file://"):
        return value
    return Path(value.removeprefix("file://"))


def _validate_location(value):
    return as_location(value) if isinstance(value, (str, Path)) else value


# A config field holding a local path or a URI (pydantic keeps the URI a str, the path a Path).
Location = Annotated[Path | str, BeforeValidator(_validate_location)]


def join(base: str | Path, *parts: str) -> str | Path:
    base = as_location(base)
    if isinstance(base, Path):
        return base.joinpath(*parts)
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def name_of(location: str | Path) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def with_suffix(location: str | Path, suffix: str) -> str | Path:
    location = as_location(location)
    if isinstance(location, Path):
        return location.with_suffix(suffix)
    head, _, tail = location.rpartition("/")
    stem = tail.rsplit(".", 1)[0] if "." in tail else tail
    return f"{head}/{stem}{suffix}"


# --- filesystems ----------------------------------------------------------------------------------------
def _s3_options(cfg: StorageConfig) -> dict:
    env = os.environ
    endpoint = cfg.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    opts: dict = {"region": cfg.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
                  "anonymous": cfg.anonymous or env.get(ANONYMOUS_ENV) == "1"}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        # pyarrow takes host:port and the scheme apart; "http" is what a loopback / in-cluster server speaks.
        opts.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    if not opts["anonymous"] and env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        opts.update(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
                    session_token=env.get("AWS_SESSION_TOKEN"))
    return opts


_FILESYSTEMS: dict[tuple, pafs.FileSystem] = {}


def s3_filesystem(cfg: StorageConfig | None = None) -> pafs.S3FileSystem:
    """An S3FileSystem for the settings (cached per distinct settings: each holds a connection pool)."""
    opts = _s3_options(cfg or active())
    key = ("s3", *sorted((k, str(v)) for k, v in opts.items()))
    if key not in _FILESYSTEMS:
        _FILESYSTEMS[key] = pafs.S3FileSystem(**opts)
    return _FILESYSTEMS[key]


def resolve(location: str | Path, cfg: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    location = as_location(location)
    if isinstance(location, Path):
        return pafs.LocalFileSystem(), str(location.resolve())
    scheme = scheme_of(location)
    rest = location.split("://", 1)[1].strip("/")
    if scheme in ("s3", "s3a"):
        return s3_filesystem(cfg), rest
    try:
        return pafs.FileSystem.from_uri(location)
    except (pafs.ArrowInvalid, NotImplementedError, ValueError):  # not a pyarrow scheme: fsspec's registry
        import fsspec

        fs, path = fsspec.core.url_to_fs(location)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


# --- operations -----------------------------------------------------------------------------------------
def exists(location: str | Path) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(location: str | Path) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def size_of(location: str | Path) -> int:
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{location}: not found")
    return int(info.size)


def list_files(location: str | Path) -> list[str]:
    """Paths (posix, relative to `location`) of every file under it, recursively, sorted; [] if it is absent."""
    return sorted(file_infos(location))


def file_infos(location: str | Path) -> dict[str, tuple[int, int | None]]:
    """{relative posix path: (size, mtime_ns or None)} of every file under `location`, from one listing."""
    fs, root = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    prefix = root.rstrip("/") + "/"
    return {i.path[len(prefix):]: (int(i.size or 0), i.mtime_ns) for i in infos
            if i.type == pafs.FileType.File and i.path.startswith(prefix)}


def read_bytes(location: str | Path) -> bytes:
    fs, path = resolve(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(location: str | Path) -> str:
    return read_bytes(location).decode("utf-8")


def write_bytes(location: str | Path, data: bytes) -> None:
    """Whole-object write: a local file appears under its name only when complete; an S3 object is
    visible only once its upload completes, so no temporary name is needed there."""
    location = as_location(location)
    if isinstance(location, Path):
        location.parent.mkdir(parents=True, exist_ok=True)
        tmp = location.with_name(location.name + ".partial")
        tmp.write_bytes(data)
        tmp.replace(location)
        return
    fs, path = resolve(location)
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_text(location: str | Path, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def open_input(location: str | Path) -> BinaryIO:
    """A sequential binary stream (buffered read-ahead for object stores)."""
    location = as_location(location)
    if isinstance(location, Path):
        return open(location, "rb", buffering=1 << 20)
    fs, path = resolve(location)
    return fs.open_input_stream(path, buffer_size=4 << 20)


def sha256(location: str | Path) -> str:
    digest = hashlib.sha256()
    with open_input(location) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def remove(location: str | Path) -> None:
    """Delete a file or object; one already gone is fine."""
    location = as_location(location)
    if isinstance(location, Path):
        location.unlink(missing_ok=True)
        return
    fs, path = resolve(location)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def upload(local: str | Path, location: str | Path) -> None:
    """Copy a local file or directory tree to `location` (pyarrow.fs.copy_files; multi-threaded for trees)."""
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(str(Path(local).resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def download(location: str | Path, local: str | Path) -> Path:
    """Copy a file or directory tree at `location` to the local path `local`."""
    fs, path = resolve(location)
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local.resolve()), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local


def cache_dir(cfg: StorageConfig | None = None) -> Path:
    cfg = cfg or active()
    root = cfg.cache_dir or os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "latentforge-cache"
    return Path(root)


@contextlib.contextmanager
def local_copy(location: str | Path) -> Iterator[Path]:
    """A local path holding `location` for the duration of the block (deleted afterwards if it was fetched).

    The copy keeps the object's file name, so decoders see its extension and messages name the real file.
    A missing object yields a path that does not exist, so callers report "not found" as they do locally.
    """
    location = as_location(location)
    if isinstance(location, Path):
        yield location
        return
    scratch = Path(tempfile.mkdtemp(prefix="lf-stage-", dir=scratch_dir()))
    try:
        target = scratch / name_of(location)
        if is_file(location):
            download(location, target)
        yield target
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def scratch_dir() -> Path:
    """Local scratch for staged inputs and groups written before upload (under the cache dir)."""
    root = cache_dir() / "scratch"
    root.mkdir(parents=True, exist_ok=True)
    return root


def fetch(location: str | Path, cfg: StorageConfig | None = None) -> Path:
    """A cached local copy of a remote file (reused while its size and modification time match)."""
    location = as_location(location)
    if isinstance(location, Path):
        return location
    fs, path = resolve(location, cfg)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{location}: not found")
    stamp = f"{location}|{info.size}|{info.mtime_ns}"
    target = cache_dir(cfg) / "objects" / hashlib.sha1(stamp.encode()).hexdigest()[:20] / name_of(location)
    if target.is_file() and target.stat().st_size == info.size:
        return target
    # Loader processes and threads may fetch the same shard at once: each writes its own partial file and the
    # rename makes one complete copy visible (identical bytes, so the last rename winning is harmless).
    partial = target.with_name(f"{target.name}.{os.getpid()}-{threading.get_ident()}.partial")
    download(location, partial)
    partial.replace(target)
    return target


def open_shard(uri: str | Path) -> BinaryIO:
    """Open a shard for a training read: local shards directly, remote ones through the local cache (so
    later epochs read from disk, and readers may seek)."""
    return open(fetch(uri), "rb", buffering=1 << 20)


# --- Ray ------------------------------------------------------------------------------------------------
def worker_env(cfg: StorageConfig | None = None) -> dict[str, str]:
    """The settings (and the credentials in this process's environment) as variables for Ray workers'
    runtime_env, so a cluster started before them, or on other machines, reads the same store."""
    cfg = cfg or active()
    opts = _s3_options(cfg)
    env = {"AWS_REGION": opts["region"]}
    if "endpoint_override" in opts:
        env["AWS_ENDPOINT_URL_S3"] = f"{opts['scheme']}://{opts['endpoint_override']}"
    if opts["anonymous"]:
        env[ANONYMOUS_ENV] = "1"
    if cfg.cache_dir:
        env[CACHE_ENV] = str(cfg.cache_dir)
    env.update({k: os.environ[k] for k in CREDENTIAL_ENV if os.environ.get(k)})
    return env


def ray_remote_args(*locations: str | Path | None) -> dict:
    """`runtime_env` keywords for Ray tasks that touch any remote location among `locations` (else none)."""
    if not any(is_remote(loc) for loc in locations if loc is not None):
        return {}
    return {"runtime_env": {"env_vars": worker_env()}}


def train_storage(location: str | Path) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig: a remote location as a path inside its
    filesystem plus that filesystem (with the endpoint override), a local one as an absolute path."""
    location = as_location(location)
    if isinstance(location, Path):
        return str(location.resolve()), None
    fs, path = resolve(location)
    return path, fs
