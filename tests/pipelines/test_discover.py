"""Discovery on small trees built for each case: symlinks out of the root, a missing root, orphan captions and
captions whatever the case of their extension. (Discovery of the demo corpus is in test_stages.py.)"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentforge.pipelines.discover import discover, orphan_captions


def test_discover_rejects_a_symlink_out_of_the_root_and_keeps_one_inside(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "a" / "real.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "elsewhere.png")
    (root / "a" / "inside.png").symlink_to(root / "a" / "real.png")
    (root / "a" / "escape.png").symlink_to(tmp_path / "elsewhere.png")
    (root / "a" / "dotdot.png").symlink_to(Path("..") / ".." / "elsewhere.png")  # relative escape
    (root / ".hidden.png").write_bytes(b"x")
    (root / "a" / "caption.TXT").write_text("not an input")
    rows = {r["relpath"]: r for r in discover(root, 10)}
    assert set(rows) == {"a/dotdot.png", "a/escape.png", "a/inside.png", "a/real.png"}
    for name in ("a/escape.png", "a/dotdot.png"):
        assert rows[name]["status"] == "rejected"
        assert rows[name]["reason"] == "outside_root" and rows[name]["stage"] == "discover"
        assert name in rows[name]["message"]
    for name in ("a/inside.png", "a/real.png"):
        assert (rows[name]["status"], rows[name]["reason"]) == ("ok", "")


def test_discover_refuses_a_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        discover(tmp_path / "nope", 4)


def test_orphan_captions_lists_captions_without_media(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.png").write_bytes(b"x")
    (tmp_path / "d" / "x.txt").write_text("x")
    (tmp_path / "d" / "lonely.txt").write_text("no media")
    assert orphan_captions(tmp_path) == ["d/lonely.txt"]
    # Paired as discover pairs them (media path with its suffix replaced by .txt): dotted stems, and names with
    # glob characters, which a per-caption glob got wrong.
    for name in ("clip.v2.mp4", "clip.v2.txt", "[a].png", "[a].txt", "a.png", "clip.txt", "e/only.TXT"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert orphan_captions(tmp_path) == ["clip.txt", "d/lonely.txt", "e/only.TXT"]
    assert {r["caption_path"] for r in discover(tmp_path, 4)} >= {str(tmp_path.resolve() / n) for n in
                                                                   ("clip.v2.txt", "[a].txt", "d/x.txt")}


def test_a_caption_is_paired_whatever_the_case_of_its_extension(tmp_path: Path) -> None:
    """`cat.TXT` beside `cat.png` is its caption (it was an input's missing_caption, and no orphan either);
    beside both `dog.txt` and `dog.TXT`, the lower-case one, the other left over. Files in dot directories are
    neither inputs nor captions."""
    for name in ("cat.png", "cat.TXT", "dog.png", "dog.txt", "dog.TXT", ".git/notes.txt", ".hidden.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("a caption")
    rows = {r["relpath"]: r for r in discover(tmp_path, 4)}
    assert set(rows) == {"cat.png", "dog.png"}
    assert rows["cat.png"]["caption_path"] == str(tmp_path.resolve() / "cat.TXT")
    assert rows["dog.png"]["caption_path"] == str(tmp_path.resolve() / "dog.txt")
    assert orphan_captions(tmp_path) == ["dog.TXT"]


def test_a_name_that_is_not_utf8_is_rejected_and_named_readably(tmp_path: Path) -> None:
    """os.walk hands such a name over with lone surrogates, which no Arrow column can hold: the input is rejected
    at discovery (not a crash of the whole job when its row is first put in a table), named with \\xNN escapes."""
    import os

    import pyarrow as pa

    from latentforge.pipelines.discover import SCHEMA, discover_table, inputs_digest

    (tmp_path / os.fsdecode(b"d\xfcr")).mkdir()
    for name in (b"caf\xe9.png", b"caf\xe9.txt", b"d\xfcr/x.png", b"lonely\xff.txt", b"ok.png"):
        (tmp_path / os.fsdecode(name)).write_bytes(b"x")
    table = discover_table(tmp_path, 2)
    assert table.schema == SCHEMA and table["shard"].to_pylist() == [0, 0, 1]
    rows = {r["relpath"]: r for r in table.to_pylist()}
    assert list(rows) == ["caf\\xe9.png", "d\\xfcr/x.png", "ok.png"]  # sorted as the escaped names
    for name in ("caf\\xe9.png", "d\\xfcr/x.png"):
        assert (rows[name]["status"], rows[name]["reason"], rows[name]["stage"]) == (
            "rejected", "undecodable_name", "discover")
        assert f"file name '{name}' is not valid UTF-8" in rows[name]["message"]
    assert (rows["ok.png"]["status"], rows["ok.png"]["uri"]) == ("ok", str(tmp_path.resolve() / "ok.png"))
    assert orphan_captions(tmp_path) == ["lonely\\xff.txt"]
    assert len(inputs_digest(table)) == 16 and pa.Table.from_pylist(discover(tmp_path, 2)).equals(table)


def test_the_listing_is_gathered_in_chunks_and_sorted_by_path(tmp_path: Path, monkeypatch) -> None:
    """Columns are made CHUNK rows at a time; the table is sorted by path as str sorts (code points) and the
    inputs digest is the one a dict per row gave (sha256 of `relpath NUL signature LF` in path order)."""
    import hashlib

    from latentforge.pipelines import discover as discover_mod

    monkeypatch.setattr(discover_mod, "CHUNK", 3)
    names = ["b/z.png", "a.png", "é.png", "Z.png", "b/a b.png", "日本.jpg", "a/c.wav", "b.png"]
    for name in names:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(name.encode())
    counts = []
    table = discover_mod.discover_table(tmp_path, 3, progress=counts.append)
    assert table["relpath"].to_pylist() == sorted(names)
    assert counts == [3, 6, 8]  # every CHUNK inputs, then all of them
    listing = discover_mod._Listing()
    for i in range(7):
        listing.add(f"{i}.png", f"/c/{i}.png", f"/c/{i}.txt", "1:2")
    assert len(listing.batches) == 2 and listing.table()["relpath"].to_pylist() == [f"{i}.png" for i in range(7)]
    assert table["id"].to_pylist() == [discover_mod.sample_id(n) for n in sorted(names)]
    h = hashlib.sha256()
    for row in table.to_pylist():
        h.update(f"{row['relpath']}\0{row['input_signature']}\n".encode())
    assert discover_mod.inputs_digest(table) == discover_mod.inputs_digest(table.to_pylist()) == h.hexdigest()[:16]
    assert discover_mod.inputs_digest(table.slice(1)) != discover_mod.inputs_digest(table)
    # in path order already: a first run's regroup hands the table back as it is, not a sorted copy
    from latentforge.pipelines.resume import regroup

    assert discover_mod.in_order(table, [("relpath", "ascending")]) is table
    assert regroup(table, {}, set(), 3)[0] is table
    backwards = discover_mod.in_order(table, [("relpath", "descending")])
    assert backwards["relpath"].to_pylist() == sorted(names, reverse=True)
