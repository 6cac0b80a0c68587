"""Captions of images and video clips from a vision-language model (transformers), on frames CaptionPrep decoded.

Several frames per clip are captioned one by one, all frames of a batch of rows in one `generate` call, and a
clip's frame captions are merged in time order ("X, then Y"; repeats dropped). Chosen over a frame grid because
single-image captioners (BLIP) were trained on single photos: a grid shrinks each frame to a quarter of the input
and draws captions like "a collage of four pictures"; per-frame captions keep full resolution and still say
what changes over the clip.

`family` picks how a model is loaded and prompted, so Florence-2 or Qwen2-VL class models plug in beside BLIP.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from latentforge.datasets.shards import load_npy
from latentforge.pipelines.caption_clean import clean_caption, merge_captions
from latentforge.pipelines.resources import StageResources, Strict
from latentforge.pipelines.stage import Batch, Stage

if TYPE_CHECKING:
    from latentforge.pipelines.config import CurationConfig

FRAMES_COLUMN = "_caption_frames"  # npy bytes of uint8 (N, S, S, 3), written by CaptionPrep


class VLMCaptionConfig(Strict):
    """A vision-language captioner; `model` is a hub id or a local directory (as `from_pretrained` takes it)."""

    enabled: bool = Field(False, description="caption images and video clips with a vision-language model")
    family: Literal["blip", "florence2", "qwen2_vl"] = Field("blip", description="how the model is loaded/prompted")
    model: str = Field("Salesforce/blip-image-captioning-base", description="hub id or local directory")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: float16 on GPU, float32 on CPU")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    prompt: str | None = Field(None, description="BLIP: text the caption continues (e.g. 'a picture of'); "
                               "florence2: a task token (default <MORE_DETAILED_CAPTION>); qwen2_vl: the instruction")
    image_size: int = Field(384, ge=8, description="side of the square frames CaptionPrep decodes (model input)")
    resize: Literal["stretch", "crop"] = Field("stretch", description="squash the whole frame to the square "
                                               "(as BLIP's processor does) or cover it and centre-crop")
    frames: int = Field(3, ge=1, description="evenly spaced frames captioned per video clip (images: 1)")
    max_parts: int = Field(3, ge=1, description="most distinct frame captions merged into a clip's caption")
    max_new_tokens: int = Field(40, ge=1)
    min_new_tokens: int = Field(0, ge=0, description="forbid ending before this many tokens")
    num_beams: int = Field(3, ge=1)
    chunk: int = Field(32, ge=1, description="most frames per generate call (bounds activation memory)")
    trust_remote_code: bool = Field(False, description="needed only by repositories with custom code")

    @model_validator(mode="before")
    @classmethod
    def _family_defaults(cls, data):
        """`model` and `image_size` left out take the family's own (BLIP's defaults fit no other family)."""
        if isinstance(data, dict):
            data = {**FAMILY_DEFAULTS.get(data.get("family", "blip"), {}), **data}
        return data


FAMILY_DEFAULTS: dict[str, dict] = {
    "florence2": {"model": "florence-community/Florence-2-base", "image_size": 768},  # its processor's 768 px
    "qwen2_vl": {"model": "Qwen/Qwen2-VL-2B-Instruct", "image_size": 448},  # dynamic size; 448 = 16x16 tokens
}


def device_and_dtype(cfg: VLMCaptionConfig, gpu_dtype: str = "float16"):
    """`auto` resolves to `gpu_dtype` on CUDA, float32 on CPU."""
    import torch

    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    if cfg.dtype == "auto":
        return device, getattr(torch, gpu_dtype) if device.type == "cuda" else torch.float32
    return device, getattr(torch, cfg.dtype)


def _image_text_model_class():
    import transformers

    # transformers 5 renamed AutoModelForVision2Seq to AutoModelForImageTextToText; 4.x has one or both.
    return getattr(transformers, "AutoModelForImageTextToText", None) or transformers.AutoModelForVision2Seq


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().exists()


class Captioner:
    """Loads a family's processor + model once; `caption(frames) -> texts`, one per uint8 (H, W, 3) frame."""

    default_prompt: ClassVar[str | None] = None
    # model_type values (config.json) this family knows how to prompt; None: any.
    model_types: ClassVar[tuple[str, ...] | None] = None
    # float16 rather than bfloat16: BLIP and Florence-2 were released and evaluated in fp16.
    gpu_dtype: ClassVar[str] = "float16"

    def __init__(self, cfg: VLMCaptionConfig):
        import torch

        self.cfg, self.torch = cfg, torch
        self.device, self.dtype = device_and_dtype(cfg, self.gpu_dtype)
        self.prompt = cfg.prompt if cfg.prompt is not None else self.default_prompt
        kwargs = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
        where = f"captioning.vlm.model={cfg.model!r} (family {cfg.family})"
        if _looks_like_path(cfg.model) and not Path(cfg.model).expanduser().is_dir():
            raise ValueError(f"{where}: no such directory")
        try:
            self.check_model_type(kwargs)
            self.load_processor(kwargs)
            model = self.load_model(kwargs)
        except (OSError, ValueError) as e:  # transformers' messages name files, not our config key
            raise ValueError(f"{where}: cannot load the captioner: {e}") from e
        self.model = model.to(self.device, self.dtype).eval()
        try:  # a prompt the processor refuses fails here once, not in every batch of the job
            self.inputs([np.zeros((32, 32, 3), np.uint8)])
        except ValueError as e:
            raise ValueError(f"captioning.vlm.prompt={self.prompt!r} (family {cfg.family}): {e}") from e

    def check_model_type(self, kwargs: dict) -> None:
        from transformers import AutoConfig

        if self.model_types is None:
            return
        model_type = AutoConfig.from_pretrained(self.cfg.model, **kwargs).model_type
        if model_type not in self.model_types:
            raise ValueError(f"a {model_type!r} model, but family {self.cfg.family} loads {list(self.model_types)}")

    def load_processor(self, kwargs: dict) -> None:
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(self.cfg.model, **kwargs)

    def load_model(self, kwargs: dict):
        return _image_text_model_class().from_pretrained(self.cfg.model, **kwargs)

    def inputs(self, frames: list[np.ndarray]) -> dict:
        if self.prompt:
            return self.processor(images=frames, text=[self.prompt] * len(frames), return_tensors="pt", padding=True)
        return self.processor(images=frames, return_tensors="pt")

    def decode(self, generated, inputs) -> list[str]:
        return self.processor.batch_decode(generated, skip_special_tokens=True)

    def caption(self, frames: list[np.ndarray]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(frames), self.cfg.chunk):
            inputs = self.inputs(frames[start : start + self.cfg.chunk])
            inputs = {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                      for k, v in inputs.items()}
            with self.torch.inference_mode():
                generated = self.model.generate(**inputs, max_new_tokens=self.cfg.max_new_tokens,
                                                min_new_tokens=self.cfg.min_new_tokens or None,
                                                num_beams=self.cfg.num_beams)
            out += [str(t).strip() for t in self.decode(generated, inputs)]
        return out


class BlipCaptioner(Captioner):
    """BLIP / BLIP-2 class: image (+ optional text prefix, echoed back in the output) -> caption."""


class Florence2Captioner(Captioner):
    """Florence-2 (transformers' native class, e.g. florence-community/Florence-2-base): the prompt is a task token,
    which the processor expands to its question; the BART decoder's output holds only the caption (its
    </s><s> wrapping is skipped as special tokens)."""

    default_prompt = "<MORE_DETAILED_CAPTION>"
    model_types = ("florence2",)


QWEN2_VL_PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                   "<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n")


class Qwen2VLCaptioner(Captioner):
    """Qwen2-VL class chat models: one user turn (image + instruction); only the new tokens are decoded.

    Loads the image processor and tokenizer rather than Qwen2VLProcessor: that processor also builds a video
    processor, which needs torchvision, and frames need none of it. What it would add for images is done here:
    each <|image_pad|> repeated once per merged patch, and `mm_token_type_ids` marking them for M-RoPE.
    """

    default_prompt = "Describe this image in one sentence."
    model_types = ("qwen2_vl", "qwen2_5_vl")
    gpu_dtype = "bfloat16"  # released in bf16; fp16 overflows to "!!!!" output (transformers issue 33294)
    image_token = "<|image_pad|>"

    def load_processor(self, kwargs: dict) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.cfg.model, **kwargs)
        self.tokenizer.padding_side = "left"  # decoder-only: new tokens must follow every prompt directly
        self.image_processor = AutoImageProcessor.from_pretrained(self.cfg.model, **kwargs)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
        self.text = (self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                     if self.tokenizer.chat_template else QWEN2_VL_PROMPT.format(prompt=self.prompt))

    def inputs(self, frames: list[np.ndarray]) -> dict:
        images = self.image_processor(images=frames, return_tensors="pt")
        tokens = images["image_grid_thw"].prod(-1) // self.image_processor.merge_size**2
        texts = [self.text.replace(self.image_token, self.image_token * int(n)) for n in tokens]
        text = self.tokenizer(texts, return_tensors="pt", padding=True)
        return {**text, **images, "mm_token_type_ids": (text["input_ids"] == self.image_token_id).long()}

    def decode(self, generated, inputs) -> list[str]:
        return self.tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


CAPTIONERS: dict[str, type[Captioner]] = {"blip": BlipCaptioner, "florence2": Florence2Captioner,
                                          "qwen2_vl": Qwen2VLCaptioner}


def append_error(errors: np.ndarray, i: int, message: str) -> None:
    errors[i] = f"{errors[i]}; {message}" if errors[i] else message


def per_row(run: Callable[[list], list[str]], items: dict[int, list]) -> dict[int, list[str] | Exception]:
    """`run` (a batched generate) over all rows' items at once; {row: its outputs, or the error that cost them}.

    If the batched call raises, each row is run alone, so one row the model or processor refuses (a bad frame,
    a waveform in two channels) costs only its own outputs, not those of every row batched with it.
    """
    rows = list(items)
    if not rows:
        return {}
    try:
        outputs = iter(run([x for i in rows for x in items[i]]))
    except Exception as e:  # any error a model raises: the rows below are what it may cost
        if len(rows) == 1:
            return {rows[0]: e}
        alone: dict[int, list[str] | Exception] = {}
        for i in rows:
            try:
                alone[i] = list(run(list(items[i])))
            except Exception as row_error:  # this row's alone
                alone[i] = row_error
        return alone
    return {i: [next(outputs) for _ in items[i]] for i in rows}


class CaptionVLM(Stage):
    """Writes `caption_generated` for ok visual rows; a row the model fails on (alone, see `per_row`) or an empty
    caption goes to `caption_error`."""

    name = "caption_vlm"
    resources = StageResources(num_cpus=1.0, num_gpus=0.0, batch_size=8, pool=1)

    @classmethod
    def enabled(cls, cfg: CurationConfig) -> bool:
        return cfg.captioning.vlm.enabled

    def __init__(self, cfg: CurationConfig):
        super().__init__(cfg)
        self.captioner = CAPTIONERS[cfg.captioning.vlm.family](cfg.captioning.vlm)

    def __call__(self, batch: Batch) -> Batch:
        out = dict(batch)
        frames = out.pop(FRAMES_COLUMN)
        n = len(out["id"])
        generated, errors = np.full(n, "", dtype=object), np.array(out["caption_error"], dtype=object)
        todo = [i for i in range(n) if out["status"][i] == "ok" and len(frames[i])]
        # a failing row costs its generated caption, not the batch's or the job's
        texts = per_row(self.captioner.caption, {i: list(load_npy(frames[i])) for i in todo})
        cfg = self.cfg.captioning
        for i, got in texts.items():
            if isinstance(got, Exception):
                append_error(errors, i, f"vlm: {type(got).__name__}: {got}")
                continue
            cleaned = [clean_caption(text, cfg.clean) for text in got]
            generated[i] = merge_captions(cleaned, max_parts=cfg.vlm.max_parts)
            if not generated[i]:
                append_error(errors, i, "vlm: empty caption after cleaning")
        out.update(caption_generated=generated, caption_error=errors)
        return out
