"""Aesthetic score of images and of the middle frame of videos (clips): a CLIP image embedding, L2-normalised,
then a small MLP head shaped like LAION's aesthetic predictor.

The CLIP vision tower loads with transformers (`CLIPVisionModelWithProjection` + its image processor through
`AutoImageProcessor`, by hub id or local directory). The head is a directory (or hub repository) holding
`aesthetic_head.safetensors` and `aesthetic_head.json` ({"input_dim": 768, "hidden_dims": [1024, 128, 64, 16],
"dropout": [0.2, 0.2, 0.1, 0.0]} are the defaults): Linear layers, a Dropout module after each whose rate is above
0, and a last Linear to one output. With those defaults the module indices are LAION's
improved-aesthetic-predictor's (`layers.0`, `layers.2`, ... `layers.7`), so its state dict saved as safetensors
loads unchanged (`save_head` writes one). The score is on the head's own scale (LAION's: roughly 1-10).
"""
from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import numpy as np
from pydantic import Field, model_validator

from latentforge.pipelines.resources import StageResources, Strict
from latentforge.pipelines.stage import Stage, error_message, map_ok_rows, mark_row
from latentforge.pipelines.stages.filter_sharpness import VISUAL, decode_still

HEAD_WEIGHTS = "aesthetic_head.safetensors"
HEAD_CONFIG = "aesthetic_head.json"
DEFAULT_HEAD = {"input_dim": 768, "hidden_dims": [1024, 128, 64, 16], "dropout": [0.2, 0.2, 0.1, 0.0]}


class AestheticConfig(Strict):
    """CLIP embedding + MLP head aesthetic score of images and video key frames; a threshold decides `keep`."""

    enabled: bool = Field(False, description="score images and videos (off by default: it needs CLIP weights)")
    clip_model: str = Field("openai/clip-vit-large-patch14", description="CLIP hub id or local directory")
    clip_revision: str | None = Field(None, description="hub revision of the CLIP model")
    head: str | None = Field(None, description=f"hub id or local directory holding {HEAD_WEIGHTS} + {HEAD_CONFIG}")
    head_revision: str | None = Field(None, description="hub revision of the head repository")
    size: int = Field(256, ge=16, description="longer side of the decoded frame handed to the CLIP processor (px)")
    min_aesthetic: float | None = Field(None, description="samples whose score_aesthetic is below this are "
                                        "filtered (None keeps all)")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto: cuda when available")
    dtype: str = Field("auto", pattern=r"^(auto|float32|bfloat16|float16)$",
                       description="CLIP weights; auto: bfloat16 on GPU, float32 on CPU (the head runs in float32)")

    @model_validator(mode="after")
    def _head_when_enabled(self) -> AestheticConfig:
        if self.enabled and not self.head:
            raise ValueError(f"head: required when enabled (a hub id or directory with {HEAD_WEIGHTS})")
        return self


def build_head(config: dict):
    """The MLP: [Linear (+ Dropout)] per hidden width, then Linear(-> 1), under the name `layers` (LAION's)."""
    from collections import OrderedDict

    import torch

    spec = {**DEFAULT_HEAD, **config}
    widths, rates = [spec["input_dim"], *spec["hidden_dims"]], list(spec["dropout"])
    if len(rates) != len(spec["hidden_dims"]):
        raise ValueError(f"{HEAD_CONFIG}: dropout needs one rate per hidden width, got {rates}")
    layers: list = []
    for (a, b), rate in zip(pairwise(widths), rates):
        layers.append(torch.nn.Linear(a, b))
        if rate > 0:
            layers.append(torch.nn.Dropout(rate))
    layers.append(torch.nn.Linear(widths[-1], 1))
    # A Sequential inside a Sequential: state-dict keys read `layers.N.*` and calling the head runs the MLP.
    return torch.nn.Sequential(OrderedDict(layers=torch.nn.Sequential(*layers)))


def save_head(head, config: dict, directory: str | Path) -> Path:
    """Write a head as `aesthetic_head.safetensors` + `aesthetic_head.json` (what `load_head` reads)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(directory / HEAD_WEIGHTS))
    (directory / HEAD_CONFIG).write_text(json.dumps({**DEFAULT_HEAD, **config}, indent=2))
    return directory


def _head_files(ref: str, revision: str | None) -> tuple[Path, Path]:
    local = Path(ref)
    if local.is_dir():
        return local / HEAD_WEIGHTS, local / HEAD_CONFIG
    from huggingface_hub import hf_hub_download

    return tuple(Path(hf_hub_download(ref, name, revision=revision)) for name in (HEAD_WEIGHTS, HEAD_CONFIG))


def load_head(ref: str, revision: str | None = None):
    """The head from a local directory or hub repository (safetensors weights, json shape); eval mode."""
    from safetensors.torch import load_file

    weights, config = _head_files(ref, revision)
    if not weights.is_file():
        raise FileNotFoundError(f"aesthetic head {ref!r} has no {HEAD_WEIGHTS}")
    head = build_head(json.loads(config.read_text()) if config.is_file() else {})
    head.load_state_dict(load_file(str(weights)))  # strict: a head of another shape fails here, not later
    return head.eval()


class AestheticScorer:
    """CLIP image embedding -> L2 normalisation -> head, on a list of uint8 RGB frames."""

    def __init__(self, cfg: AestheticConfig):
        import torch
        from transformers import AutoImageProcessor, CLIPVisionModelWithProjection

        from latentforge.datasets.encoders.devices import resolve_device, resolve_dtype

        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        # AutoImageProcessor picks the torchvision backend where torchvision is installed and PIL otherwise;
        # naming CLIPImageProcessor instead warns in every actor, on transformers 5, that it fell back to PIL.
        self.processor = AutoImageProcessor.from_pretrained(cfg.clip_model, revision=cfg.clip_revision)
        self.clip = CLIPVisionModelWithProjection.from_pretrained(
            cfg.clip_model, revision=cfg.clip_revision, dtype=self.dtype).to(self.device).eval()
        self.head = load_head(cfg.head, cfg.head_revision).to(self.device)
        width = self.head.layers[0].in_features
        if width != self.clip.config.projection_dim:
            raise ValueError(f"aesthetic head {cfg.head!r} takes {width}-dim embeddings but CLIP "
                             f"{cfg.clip_model!r} projects to {self.clip.config.projection_dim}")
        self._torch = torch

    def __call__(self, frames: list[np.ndarray]) -> np.ndarray:
        torch = self._torch
        pixels = self.processor(images=frames, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            embeds = self.clip(pixel_values=pixels.to(self.device, self.dtype)).image_embeds.float()
            embeds = embeds / embeds.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            return self.head(embeds)[:, 0].cpu().numpy()


# The image, the middle frame of a clip (split videos) or of the whole video: one implementation, shared
# with the sharpness and text-area scores.
key_frame = decode_still


def score_key_frames(stage: Stage, batch, model, column: str, size: int):
    """Decode each ok visual row's key frame (a broken file costs its row only), then one `model` call on
    the batch's frames; `column` gets the scores. Shared by the model-based key-frame scores."""
    def frame(row: dict) -> dict:
        if row["modality"] not in VISUAL:
            return {}
        return {"_key_frame": key_frame(row, size, stage.cfg.decode_timeout_s)}

    decoded = map_ok_rows(batch, frame, {**stage.outputs, "_key_frame": None}, stage.name)
    frames = decoded.pop("_key_frame")
    todo = [i for i, f in enumerate(frames) if f is not None and decoded["status"][i] == "ok"]
    if todo:
        scores = np.asarray(decoded[column], dtype=np.float64)
        try:
            scores[todo] = model([frames[i] for i in todo])
        except Exception:  # one frame the model chokes on must cost its row, not the batch: score one by one
            for i in todo:
                try:
                    scores[i] = model([frames[i]])[0]
                except Exception as e:
                    mark_row(decoded, i, stage.name, "rejected", "stage_error", error_message(e))
        decoded[column] = scores
    return decoded


def mark_filtered(stage: Stage, batch, keep, reason: str, message):
    """Rows still ok whose visual score fails `keep(score)` become `filtered` by `stage`."""
    column = next(iter(stage.outputs))
    for i, status in enumerate(batch["status"]):
        score = float(batch[column][i])
        if status == "ok" and batch["modality"][i] in VISUAL and not keep(score):
            mark_row(batch, i, stage.name, "filtered", reason, message(score))
    return batch


class ScoreAesthetic(Stage):
    """Writes `score_aesthetic` for images and videos; audio rows pass with the default."""

    name = "score_aesthetic"
    resources = StageResources(num_cpus=1.0, num_gpus=0.0, batch_size=16, pool=1)
    outputs = {"score_aesthetic": 0.0}

    @classmethod
    def enabled(cls, cfg) -> bool:
        """Off: left out of the Ray Data chain (no actor pool); the manifest column is then null."""
        return cfg.aesthetic.enabled

    def __init__(self, cfg):
        super().__init__(cfg)
        self.scorer = AestheticScorer(cfg.aesthetic) if cfg.aesthetic.enabled else None

    def __call__(self, batch):
        if self.scorer is None:
            return map_ok_rows(batch, lambda row: {}, self.outputs, self.name)
        scored = score_key_frames(self, batch, self.scorer, "score_aesthetic", self.cfg.aesthetic.size)
        minimum = self.cfg.aesthetic.min_aesthetic
        if minimum is None:
            return scored
        return mark_filtered(self, scored, lambda s: s >= minimum, "aesthetic_below_min",
                             lambda s: f"aesthetic score {s:.3f} < {minimum}")
