"""Discovery: every file under the input root becomes one row, so every input can be accounted for."""
from __future__ import annotations

import hashlib
import os
import posixpath
from pathlib import Path

from latentforge.datasets import storage

CAPTION_EXT = ".txt"


def sample_id(relpath: str) -> str:
    """A stable id from the path under the input root (no dots: WebDataset splits keys at the first dot)."""
    return "s" + hashlib.sha1(relpath.encode("utf-8")).hexdigest()[:16]


def _row(relpath: str, uri: str, caption_path: str, signature: str) -> dict:
    """A discovered input, local or remote: `caption_path` is its paired caption's, or where one would be;
    `signature` the size and modification time of the file and of its caption (see `signature`)."""
    return {"id": sample_id(relpath), "uri": uri, "relpath": relpath, "caption_path": caption_path,
            "status": "ok", "reason": "", "message": "", "stage": "", "input_signature": signature}


def signature(media: tuple[int, int | None] | None, caption: tuple[int, int | None] | None = None) -> str:
    """'size:mtime_ns' of an input file, then '|' and its caption's when it has one: what a rerun compares with
    the done-markers to notice an input or its caption changed in place under the same name (resume.py). Cheap:
    one stat, or the listing's entry on an object store; a change that keeps both size and time is missed."""
    def one(info):
        return "missing" if info is None else f"{info[0]}:{'' if info[1] is None else info[1]}"

    return one(media) + ("" if caption is None else "|" + one(caption))


def inputs_digest(rows: list[dict]) -> str:
    """What a curation was made from, in 16 hex digits: every discovered input's path and signature."""
    h = hashlib.sha256()
    for r in sorted(rows, key=lambda r: r["relpath"]):
        h.update(f"{r['relpath']}\0{r.get('input_signature', '')}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()  # follows a link: its target's content is what is read
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _is_caption(path: Path) -> bool:
    return path.suffix.lower() == CAPTION_EXT


def _hidden(relpath: str) -> bool:
    """Dot files and anything in a dot directory (.git, .cache, ...): not inputs, nor captions."""
    return any(part.startswith(".") for part in relpath.split("/"))


def _captions_by_stem(paths: list[str]) -> dict[str, str]:
    """Caption files by their path less the extension, matched without regard to its case (`cat.TXT` is
    `cat.png`'s caption); where both `cat.txt` and `cat.TXT` exist, the lower-case one."""
    out: dict[str, str] = {}
    for p in sorted(paths, key=lambda p: p.endswith(CAPTION_EXT)):  # exact ".txt" last, so it wins
        if p.lower().endswith(CAPTION_EXT):
            out[p[:-len(CAPTION_EXT)]] = p
    return out


def discover(root: str | Path, samples_per_shard: int) -> list[dict]:
    """Rows for all non-caption files under `root` (a directory or a URI prefix such as s3://bucket/corpus),
    sorted by path, each assigned a shard index.

    Symlinks are not followed into directories, and a linked file that resolves outside the root is
    rejected here rather than read.
    """
    rows = _remote_rows(str(storage.as_location(root))) if storage.is_remote(root) else _local_rows(root)
    rows.sort(key=lambda r: r["relpath"])
    for i, row in enumerate(rows):
        row["shard"] = i // samples_per_shard
    return rows


def _remote_rows(root: str) -> list[dict]:
    """One row per object under the prefix; stages fetch an object only when they read it (stage.py)."""
    rows = []
    infos = {p: info for p, info in storage.file_infos(root).items() if not _hidden(p)}
    listing = sorted(infos)
    captions = _captions_by_stem(listing)
    for relpath in listing:
        if relpath.lower().endswith(CAPTION_EXT):
            continue
        uri = storage.join(root, relpath)
        caption = captions.get(posixpath.splitext(relpath)[0])
        caption_uri = storage.join(root, caption) if caption else storage.with_suffix(uri, CAPTION_EXT)
        rows.append(_row(relpath, uri, caption_uri, signature(infos[relpath], infos[caption] if caption else None)))
    return rows


def _local_rows(root: str | Path) -> list[dict]:
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"input directory {root} does not exist")
    rows = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        captions = _captions_by_stem([n for n in filenames if not n.startswith(".")])
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or _is_caption(path):
                continue
            caption = captions.get(posixpath.splitext(name)[0])
            row = _row(path.relative_to(root).as_posix(), str(path),
                       str(Path(dirpath) / caption if caption else path.with_suffix(CAPTION_EXT)),
                       signature(_stat(path), _stat(Path(dirpath) / caption) if caption else None))
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                row.update(status="rejected", reason="outside_root", stage="discover",
                           message=f"symlink {row['relpath']} points outside the input root")
            rows.append(row)
    return rows


def orphan_captions(root: str | Path) -> list[str]:
    """Caption files with no media file beside them (reported, not inputs), as relative paths, sorted."""
    if storage.is_remote(root):
        return _unpaired([p for p in storage.list_files(root) if not _hidden(p)])
    root = Path(root).resolve()
    relpaths = []
    for d, dirnames, names in os.walk(root):
        dirnames[:] = [n for n in dirnames if not n.startswith(".")]  # as discover: .git's files are no captions
        relpaths += [(Path(d) / n).relative_to(root).as_posix() for n in names if not n.startswith(".")]
    return _unpaired(relpaths)


def _unpaired(relpaths: list[str]) -> list[str]:
    """The captions among `relpaths` whose path less `.txt` is no media file's path less its suffix (how
    discover pairs them). One set over the listing: a glob per caption, as this once was, lists the caption's
    directory each time (quadratic: 12.8 s of a 5,776-input job's 97 s) and misreads names with glob characters."""
    media = {posixpath.splitext(f)[0] for f in relpaths if not f.lower().endswith(CAPTION_EXT)}
    paired = set(_captions_by_stem(relpaths).items())  # one caption per media file, as discover pairs them
    return sorted(f for f in relpaths if f.lower().endswith(CAPTION_EXT)
                  and (f[:-len(CAPTION_EXT)] not in media or (f[:-len(CAPTION_EXT)], f) not in paired))
