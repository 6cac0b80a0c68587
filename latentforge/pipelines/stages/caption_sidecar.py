"""Captions from sidecar `.txt` files next to each media file (UTF-8, with a letter or digit)."""
from __future__ import annotations

import codecs
import unicodedata
from pathlib import Path

from latentforge.pipelines.resources import StageResources
from latentforge.pipelines.stage import Reject, Stage

MAX_CAPTION_BYTES = 16_384
# Zero-width joiners are format characters too, but they carry meaning (emoji sequences, Persian spelling).
_JOINERS = {"\u200c", "\u200d"}


def visible_text(text: str) -> str:
    """`text` without control and format characters (NUL, a byte-order mark, zero-width spaces, bidi marks),
    whitespace squeezed to single spaces."""
    kept = (c for c in text if c.isspace() or c in _JOINERS or unicodedata.category(c) not in ("Cc", "Cf"))
    return " ".join("".join(kept).split())


def read_sidecar_caption(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise Reject("missing_caption", f"no caption file {path.name} beside the media file")
    with path.open("rb") as f:
        data = f.read(MAX_CAPTION_BYTES + 1)
    truncated, data = len(data) > MAX_CAPTION_BYTES, data[:MAX_CAPTION_BYTES]
    try:
        # A cut at the byte limit may split a character: drop that partial character rather than reject.
        text = codecs.getincrementaldecoder("utf-8")().decode(data, final=not truncated)
    except UnicodeDecodeError as e:
        raise Reject("caption_not_utf8", f"caption {path.name} is not valid UTF-8 ({e.reason} at byte {e.start})")
    text = visible_text(text)
    if not any(c.isalnum() for c in text):
        raise Reject("empty_caption", f"caption {path.name} is empty" if not text else
                     f"caption {path.name} has no letter or digit ({text[:20]!r})")
    return text


class CaptionSidecar(Stage):
    """`caption` and `caption_sidecar` from the sidecar file. A missing or unreadable one rejects the row, unless
    a captioner is enabled (`captioning`): then the reason goes to `caption_error` and CaptionSelect decides."""

    name = "caption_sidecar"
    resources = StageResources(num_cpus=0.25, batch_size=32, pool=1)
    outputs = {"caption": "", "score_caption_words": 0.0, "caption_sidecar": "", "caption_origin": "",
               "caption_error": ""}

    def process_row(self, row: dict) -> dict:
        try:
            caption = read_sidecar_caption(row["caption_path"])
        except Reject as r:
            if self.cfg.captioning.sidecar_required:
                raise
            return {"caption_error": f"sidecar: {r.reason}: {r.message}"}
        return {"caption": caption, "score_caption_words": float(len(caption.split())), "caption_sidecar": caption,
                "caption_origin": "sidecar"}
