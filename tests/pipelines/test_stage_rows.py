"""Single stages on small hand-made batches: a stage's exception or Reject costs only its row, a vanished file,
sidecar captions, an unknown modality, and a batch with nothing left to process. No Ray; the stages are called
the way an actor calls them."""
from __future__ import annotations

from pathlib import Path

import pytest
from lf_batches import to_batch

from latentforge.pipelines.config import CurationConfig
from latentforge.pipelines.stage import Reject, Stage, map_ok_rows
from latentforge.pipelines.stages.caption_sidecar import CaptionSidecar, read_sidecar_caption
from latentforge.pipelines.stages.encode_latents import EncodeLatents
from latentforge.pipelines.stages.probe_media import ProbeMedia


@pytest.fixture
def cfg(tmp_path: Path) -> CurationConfig:
    return CurationConfig(input_dir=tmp_path)


class Explode(Stage):
    name = "explode"
    outputs = {"x": 0}

    def process_row(self, row: dict) -> dict:
        if row["id"] == "boom":
            raise ZeroDivisionError("division by zero in a stage")
        if row["id"] == "weak":
            raise Reject("too_weak", "score below the bar", status="filtered")
        return {"x": 7}


def plain_rows(ids: list[str], status: dict[str, str] | None = None) -> list[dict]:
    status = status or {}
    return [{"id": i, "status": status.get(i, "ok"), "reason": "earlier" if i in status else "", "message": "",
             "stage": "before" if i in status else ""} for i in ids]


def test_an_exception_in_process_row_rejects_that_row_only(cfg: CurationConfig) -> None:
    batch = to_batch(plain_rows(["a", "boom", "gone", "weak", "b"], status={"gone": "rejected"}))
    out = Explode(cfg)(batch)
    assert list(out["id"]) == ["a", "boom", "gone", "weak", "b"]
    assert list(out["x"]) == [7, 0, 0, 0, 7]
    assert out["x"].dtype.kind == "i"
    assert list(out["status"]) == ["ok", "rejected", "rejected", "filtered", "ok"]
    assert list(out["reason"]) == ["", "stage_error", "earlier", "too_weak", ""]
    assert list(out["stage"]) == ["", "explode", "before", "explode", ""]
    assert "ZeroDivisionError" in out["message"][1] and "division by zero" in out["message"][1]
    assert out["message"][3] == "score below the bar"
    # The input batch is not modified in place.
    assert list(batch["status"]) == ["ok", "ok", "rejected", "ok", "ok"]


def test_probe_turns_a_vanished_file_into_a_rejection(cfg: CurationConfig, tmp_path: Path) -> None:
    rows = [{**r, "uri": str(tmp_path / "gone.png")} for r in plain_rows(["a"])]
    out = ProbeMedia(cfg)(to_batch(rows))
    assert (out["status"][0], out["reason"][0], out["stage"][0]) == ("rejected", "not_found", "probe")
    assert out["width"][0] == 0 and out["modality"][0] == ""


def test_caption_sidecar_normalises_and_rejects(cfg: CurationConfig, tmp_path: Path) -> None:
    files = {"spaces": "  a  red\n\tcircle  ", "empty": " \n\t ", "good": "fine"}
    rows = plain_rows(list(files) + ["missing"])
    for row in rows:
        row["caption_path"] = str(tmp_path / f"{row['id']}.txt")
        if row["id"] in files:
            (tmp_path / f"{row['id']}.txt").write_text(files[row["id"]], encoding="utf-8")
    out = CaptionSidecar(cfg)(to_batch(rows))
    assert list(out["caption"]) == ["a red circle", "", "fine", ""]
    assert list(out["score_caption_words"]) == [3.0, 0.0, 1.0, 0.0]
    assert list(out["reason"]) == ["", "empty_caption", "", "missing_caption"]


def test_a_long_valid_utf8_caption_is_truncated_not_rejected(tmp_path: Path) -> None:
    path = tmp_path / "long.txt"
    path.write_text("a" + "\u00e9" * 10_000, encoding="utf-8")  # byte 16384 falls inside an 'é'
    caption = read_sidecar_caption(path)
    assert caption.startswith("a\u00e9") and len(caption.encode("utf-8")) <= 16_384


def test_encode_latents_refuses_an_unknown_modality(cfg: CurationConfig) -> None:
    rows = [{**r, "modality": "text", "uri": "/nonexistent"} for r in plain_rows(["a"])]
    out = EncodeLatents(cfg)(to_batch(rows))
    assert (out["status"][0], out["reason"][0], out["stage"][0]) == ("rejected", "unsupported_modality",
                                                                     "encode_latents")
    assert out["latent"][0] == b""


def test_map_ok_rows_on_an_all_rejected_batch_keeps_defaults() -> None:
    batch = to_batch(plain_rows(["a", "b"], status={"a": "rejected", "b": "filtered"}))
    out = map_ok_rows(batch, lambda row: {"y": 1.5}, {"y": 0.0, "shape": []}, "noop")
    assert list(out["y"]) == [0.0, 0.0] and list(out["shape"]) == [[], []]
    assert list(out["status"]) == ["rejected", "filtered"]
