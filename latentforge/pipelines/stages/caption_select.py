"""The captioning policy: which caption (`sidecar`, `vlm`, `audio`) becomes the `caption` EncodeText embeds.

Every source stays in its own manifest column (`caption_sidecar`, `caption_generated`, `caption_audio`), the
chosen one is copied to `caption` and named in `caption_origin`; a row left without any caption is rejected
with reason `no_caption` (and what went wrong with each source, from `caption_error`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from latentforge.pipelines.caption_clean import CaptionCleanConfig, clean_caption
from latentforge.pipelines.resources import StageResources, Strict
from latentforge.pipelines.stage import Reject, Stage
from latentforge.pipelines.stages.caption_audio import AudioCaptionConfig
from latentforge.pipelines.stages.caption_vlm import VLMCaptionConfig

if TYPE_CHECKING:
    from latentforge.pipelines.config import CurationConfig

CaptionSource = Literal["sidecar", "vlm", "audio"]
SOURCE_COLUMNS: dict[str, str] = {"sidecar": "caption_sidecar", "vlm": "caption_generated", "audio": "caption_audio"}


class CaptioningConfig(Strict):
    """Generated captions (off by default: they need model weights) and the policy choosing `caption`."""

    vlm: VLMCaptionConfig = VLMCaptionConfig()
    audio: AudioCaptionConfig = AudioCaptionConfig()
    clean: CaptionCleanConfig = CaptionCleanConfig()
    prefer: list[CaptionSource] = Field(default_factory=lambda: ["sidecar", "vlm", "audio"],
                                        description="the first non-empty source in this order becomes `caption`")

    @model_validator(mode="after")
    def _sources_usable(self) -> CaptioningConfig:
        if not self.prefer or len(set(self.prefer)) != len(self.prefer):
            raise ValueError(f"prefer must list distinct sources, got {self.prefer}")
        for source in ("vlm", "audio"):
            if getattr(self, source).enabled and source not in self.prefer:
                raise ValueError(f"{source}.enabled is true but {source!r} is not in prefer {self.prefer}; "
                                 "its captions would never be used")
        return self

    @property
    def generates(self) -> bool:
        return self.vlm.enabled or self.audio.enabled

    @property
    def sidecar_required(self) -> bool:
        """A missing sidecar rejects the row only when no captioner could stand in for it."""
        return not self.generates


class CaptionSelect(Stage):
    """Copies the preferred non-empty caption source to `caption`; rejects rows that have none."""

    name = "caption_select"
    resources = StageResources(num_cpus=0.25, batch_size=32, pool=1)
    outputs = {"caption": "", "caption_origin": "", "score_caption_words": 0.0}

    @classmethod
    def enabled(cls, cfg: CurationConfig) -> bool:
        """Runs when there is a choice to make or sidecar captions to clean; otherwise CaptionSidecar's `caption`
        stands and this stage costs nothing."""
        clean = cfg.captioning.clean
        return cfg.captioning.generates or (clean.enabled and clean.clean_sidecar)

    def process_row(self, row: dict) -> dict:
        cap = self.cfg.captioning
        # Without a captioner the sidecar is the caption whatever `prefer` says, as when this stage is left out.
        sources = cap.prefer if cap.generates else ["sidecar"]
        notes = [str(row.get("caption_error") or "")]
        for source in sources:
            text = str(row.get(SOURCE_COLUMNS[source]) or "")
            if source == "sidecar" and cap.clean.clean_sidecar and text:
                text = clean_caption(text, cap.clean)
                if not text:
                    notes.append("sidecar: nothing left after cleaning")
            if text:
                return {"caption": text, "caption_origin": source, "score_caption_words": float(len(text.split()))}
        why = "; ".join(n for n in notes if n)
        raise Reject("no_caption", f"no caption from {', '.join(sources)}" + (f" ({why})" if why else ""))
