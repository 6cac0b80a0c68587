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
