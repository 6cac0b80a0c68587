"""Captions of audio rows and videos' audio tracks from Whisper (transformers), batched, on 16 kHz mono waveforms
CaptionPrep decoded.

Whisper transcribes speech; on music or effects it says little (or hallucinates), so its text usually serves
as a fallback behind sidecar captions in `captioning.prefer`, and cleaning drops what it cannot use.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from latentforge.datasets.shards import load_npy
from latentforge.pipelines.caption_clean import clean_caption
from latentforge.pipelines.resources import StageResources, Strict
from latentforge.pipelines.stage import Batch, Stage
from latentforge.pipelines.stages.caption_vlm import append_error, device_and_dtype, per_row

if TYPE_CHECKING:
    from latentforge.pipelines.config import CurationConfig

AUDIO_COLUMN = "_caption_audio"  # npy bytes of float32 mono at `sample_rate`, written by CaptionPrep


class AudioCaptionConfig(Strict):
    """Whisper transcription as an audio caption; `model` is a hub id or a local directory."""

    enabled: bool = Field(False, description="caption audio rows with Whisper")
    model: str = Field("openai/whisper-small", description="hub id or local directory")
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: float16 on GPU, float32 on CPU")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    sample_rate: int = Field(16000, ge=1000, description="rate Whisper's feature extractor expects")
    max_seconds: float = Field(30.0, gt=0, description="audio is cut to this (Whisper's window is 30 s)")
    language: str | None = Field(None, description="e.g. 'en'; None lets a multilingual model detect it")
    task: Literal["transcribe", "translate"] = "transcribe"
    max_new_tokens: int = Field(128, ge=1)
    num_beams: int = Field(1, ge=1)
    chunk: int = Field(16, ge=1, description="most waveforms per generate call")


class WhisperCaptioner:
    """WhisperProcessor + WhisperForConditionalGeneration; `transcribe(waveforms) -> texts`."""

    def __init__(self, cfg: AudioCaptionConfig):
        import torch
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.cfg, self.torch = cfg, torch
        self.device, self.dtype = device_and_dtype(cfg)
        self.processor = WhisperProcessor.from_pretrained(cfg.model, revision=cfg.revision)
        model = WhisperForConditionalGeneration.from_pretrained(cfg.model, revision=cfg.revision)
        self.model = model.to(self.device, self.dtype).eval()
        # Language/task prompts exist only on multilingual checkpoints; English-only ones refuse them.
        multilingual = getattr(self.model.generation_config, "is_multilingual", False)
        self.prompt = {"task": cfg.task, **({"language": cfg.language} if cfg.language else {})} if multilingual else {}

    def transcribe(self, waveforms: list[np.ndarray]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(waveforms), self.cfg.chunk):
            inputs = self.processor(waveforms[start : start + self.cfg.chunk], sampling_rate=self.cfg.sample_rate,
                                    return_tensors="pt", return_attention_mask=True)
            with self.torch.inference_mode():
                generated = self.model.generate(
                    input_features=inputs.input_features.to(self.device, self.dtype),
                    attention_mask=inputs.attention_mask.to(self.device), max_new_tokens=self.cfg.max_new_tokens,
                    num_beams=self.cfg.num_beams, **self.prompt)
            out += [str(t) for t in self.processor.batch_decode(generated, skip_special_tokens=True)]
        return out


class CaptionAudio(Stage):
    """Writes `caption_audio` for ok rows with a waveform (audio, videos with a track); a row Whisper fails on
    (alone, see `per_row`) goes to `caption_error`."""

    name = "caption_audio"
    resources = StageResources(num_cpus=1.0, num_gpus=0.0, batch_size=8, pool=1)

    @classmethod
    def enabled(cls, cfg: CurationConfig) -> bool:
        return cfg.captioning.audio.enabled

    def __init__(self, cfg: CurationConfig):
        super().__init__(cfg)
        self.captioner = WhisperCaptioner(cfg.captioning.audio)

    def __call__(self, batch: Batch) -> Batch:
        out = dict(batch)
        waves = out.pop(AUDIO_COLUMN)
        n = len(out["id"])
        texts, errors = np.full(n, "", dtype=object), np.array(out["caption_error"], dtype=object)
        todo = [i for i in range(n) if out["status"][i] == "ok" and len(waves[i])]
        # a failing row costs its audio caption, not the batch's or the job's
        raw = per_row(self.captioner.transcribe, {i: [load_npy(waves[i])] for i in todo})
        for i, got in raw.items():
            if isinstance(got, Exception):
                append_error(errors, i, f"audio: {type(got).__name__}: {got}")
                continue
            texts[i] = clean_caption(got[0], self.cfg.captioning.clean)
            if not texts[i]:
                append_error(errors, i, "audio: empty transcript after cleaning")
        out.update(caption_audio=texts, caption_error=errors)
        return out
