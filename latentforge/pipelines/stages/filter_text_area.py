"""Fraction of the frame covered by text (images and the middle frame of videos), for dropping slides,
screenshots and heavily captioned or watermarked media.

Text is found by the PP-OCRv4 detector that `rapidocr-onnxruntime` ships in its wheel (ONNX, run on CPU by
onnxruntime; nothing is downloaded). Only the detector is loaded: recognition would read the text, which
is not needed to measure its area. The detected quadrilaterals are filled into a mask at the working size,
so overlapping boxes count once, and `score_text_area` is the mask's mean (0 = no text, 1 = all text).
"""
from __future__ import annotations

import numpy as np
from pydantic import Field

from latentforge.pipelines.resources import StageResources, Strict
from latentforge.pipelines.stage import Stage, worker_threads
from latentforge.pipelines.stages.filter_sharpness import VISUAL, decode_still


class TextAreaConfig(Strict):
    """OCR-detector text coverage of images and middle video frames; thresholds decide `keep`."""

    enabled: bool = Field(True, description="score images and videos (when off, rows pass with default scores)")
    size: int = Field(512, ge=32, description="longer side of the frame handed to the text detector (px)")
    max_text_area: float = Field(
        1.0, ge=0, le=1, description="samples whose score_text_area (covered fraction) is above this are filtered"
    )


def load_text_detector(size: int):
    """rapidocr's packaged text detector, set to work at `size` (longer side, rounded to a multiple of 32)."""
    # Imported here: onnxruntime and the detector load once per actor, not at module import.
    from rapidocr_onnxruntime.ch_ppocr_det import TextDetector
    from rapidocr_onnxruntime.main import DEFAULT_CFG_PATH
    from rapidocr_onnxruntime.utils import read_yaml, update_model_path

    det = dict(update_model_path(read_yaml(str(DEFAULT_CFG_PATH)))["Det"])
    # The package default upsamples so the *shorter* side is >= 736 px; we score at a fixed working size.
    det.update(limit_side_len=size, limit_type="max", use_cuda=False, use_dml=False)
    # In a Ray worker, as many onnxruntime threads as CPUs granted (else one per core, spinning, per actor).
    threads = worker_threads()
    det.update(intra_op_num_threads=threads or -1, inter_op_num_threads=1 if threads else -1)
    return TextDetector(det)


def text_area_fraction(detector, rgb: np.ndarray) -> float:
    """Union area of the detected text boxes over the frame area."""
    import cv2

    boxes, _ = detector(np.ascontiguousarray(rgb[..., ::-1]))  # the detector expects OpenCV's BGR order
    if boxes is None or len(boxes) == 0:
        return 0.0
    mask = np.zeros(rgb.shape[:2], dtype=np.uint8)
    cv2.fillPoly(mask, [np.round(box).astype(np.int32) for box in boxes], 1)
    return float(mask.mean())


class FilterTextArea(Stage):
    """Scores the text-covered fraction of images and videos; audio rows pass through with the default."""

    name = "filter_text_area"
    resources = StageResources(num_cpus=1.0, batch_size=8, pool=1)
    outputs = {"score_text_area": 0.0}

    def __init__(self, cfg):
        super().__init__(cfg)
        self.detector = load_text_detector(cfg.text_area.size) if cfg.text_area.enabled else None

    def __call__(self, batch):
        # Scores first for every ok row, the verdict afterwards, so a filtered row keeps its score.
        scored = super().__call__(batch)
        return self._verdicts(scored) if self.cfg.text_area.enabled else scored

    def process_row(self, row: dict) -> dict:
        cfg = self.cfg.text_area
        if not cfg.enabled or row["modality"] not in VISUAL:
            return {}
        rgb = decode_still(row, cfg.size, self.cfg.decode_timeout_s)
        return {"score_text_area": text_area_fraction(self.detector, rgb)}

    def _verdicts(self, batch):
        maximum = self.cfg.text_area.max_text_area
        for i, status in enumerate(batch["status"]):
            if status != "ok" or batch["modality"][i] not in VISUAL:
                continue
            area = float(batch["score_text_area"][i])
            if area > maximum:
                batch["status"][i], batch["stage"][i] = "filtered", self.name
                batch["reason"][i] = "text_area_above_max"
                batch["message"][i] = f"text covers {area:.1%} of the frame > {maximum:.1%}"
        return batch
