"""Sidecar caption text: invisible characters, and cleaning on request whether or not a captioner runs.

Real sidecar files beside real images, read by the real stages (CaptionSidecar, then the caption stages the
config turns on)."""
from __future__ import annotations

from pathlib import Path

import pytest
from lf_batches import to_batch
from PIL import Image

from latentforge.pipelines.config import CurationConfig
from latentforge.pipelines.curate import STAGES, active_stages
from latentforge.pipelines.discover import discover
from latentforge.pipelines.stage import rows_of
from latentforge.pipelines.stages.caption_select import CaptionSelect
from latentforge.pipelines.stages.caption_sidecar import CaptionSidecar


def corpus(root: Path, captions: dict[str, bytes]) -> Path:
    """One small image per caption, its sidecar holding exactly these bytes."""
    root.mkdir(exist_ok=True)
    for name, data in captions.items():
        Image.new("RGB", (16, 16), (200, 30, 30)).save(root / f"{name}.png")
        (root / f"{name}.txt").write_bytes(data)
    return root


def caption_rows(root: Path, **captioning) -> dict[str, dict]:
    """Each image's row after CaptionSidecar and every caption stage this config runs, by file name."""
    cfg = CurationConfig(input_dir=root, captioning=captioning)
    batch = CaptionSidecar(cfg)(to_batch(discover(root, samples_per_shard=64)))
    for stage in active_stages(STAGES, cfg):
        if stage.name.startswith("caption"):
            batch = stage(cfg)(batch)
    return {Path(r["relpath"]).stem: r for r in rows_of(batch)}


def test_a_byte_order_mark_is_not_part_of_the_caption(tmp_path: Path) -> None:
    rows = caption_rows(corpus(tmp_path / "c", {"bom": "\ufeffA dog on a beach".encode()}))
    assert rows["bom"]["caption"] == rows["bom"]["caption_sidecar"] == "A dog on a beach"


def test_invisible_characters_inside_a_caption_are_removed(tmp_path: Path) -> None:
    rows = caption_rows(corpus(tmp_path / "c", {"zw": "A dog\u200b on a\x00 beach\u200e".encode(),
                                                "family": "a family \U0001f468\u200d\U0001f469".encode()}))
    assert rows["zw"]["caption"] == "A dog on a beach"
    assert rows["family"]["caption"] == "a family \U0001f468\u200d\U0001f469"  # the joiner makes one emoji


@pytest.mark.parametrize("data", ["\u200b\u200b".encode(), b"\x00\x00\x00", "\ufeff".encode(),
                                  "\u2060 \x07\u200d".encode(), b" ... "])
def test_a_caption_without_a_letter_or_digit_is_empty(tmp_path: Path, data: bytes) -> None:
    row = caption_rows(corpus(tmp_path / "c", {"x": data}))["x"]
    assert (row["status"], row["reason"], row["caption"]) == ("rejected", "empty_caption", "")


@pytest.mark.parametrize("data", ["Caf\u00e9 au lait".encode("latin-1"), b"\xef\xbb\xbfCaf\xe9"])
def test_a_caption_that_is_not_utf8_is_still_rejected_as_such(tmp_path: Path, data: bytes) -> None:
    row = caption_rows(corpus(tmp_path / "c", {"x": data}))["x"]
    assert (row["status"], row["reason"]) == ("rejected", "caption_not_utf8")


def test_sidecar_cleaning_runs_without_a_captioner(tmp_path: Path) -> None:
    root = corpus(tmp_path / "c", {"house": b"An image of a house", "dog": b"arafed dog on a beach"})
    rows = caption_rows(root, clean={"clean_sidecar": True})
    assert [rows[n]["caption"] for n in ("house", "dog")] == ["a house", "dog on a beach"]
    assert [rows[n]["caption_sidecar"] for n in ("house", "dog")] == ["An image of a house", "arafed dog on a beach"]
    assert {rows[n]["caption_origin"] for n in rows} == {"sidecar"}
    assert rows["house"]["score_caption_words"] == 2.0
    # No captioner runs, so the sidecar is the caption even when `prefer` does not name it.
    assert caption_rows(root, clean={"clean_sidecar": True}, prefer=["vlm"])["house"]["caption"] == "a house"


def test_a_sidecar_cleaned_to_nothing_is_rejected_with_why(tmp_path: Path) -> None:
    row = caption_rows(corpus(tmp_path / "c", {"x": b"arafed"}), clean={"clean_sidecar": True})["x"]
    assert (row["status"], row["reason"], row["stage"]) == ("rejected", "no_caption", "caption_select")
    assert "cleaning" in row["message"]


@pytest.mark.parametrize("clean, runs", [({}, False), ({"clean_sidecar": True}, True),
                                         ({"clean_sidecar": True, "enabled": False}, False)])
def test_caption_select_runs_without_a_captioner_only_to_clean(tmp_path: Path, clean: dict, runs: bool) -> None:
    cfg = CurationConfig(input_dir=tmp_path, captioning={"clean": clean})
    assert (CaptionSelect in active_stages(STAGES, cfg)) == runs
    if not runs:  # CaptionSidecar's caption stands, as read
        rows = caption_rows(corpus(tmp_path / "c", {"x": b"An image of a house"}), clean=clean)
        assert rows["x"]["caption"] == "An image of a house"

