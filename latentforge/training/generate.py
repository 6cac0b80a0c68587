"""Generate from a trained stage's exported weights and any prompt: what `latentforge generate` runs.

An export (WORKDIR/exports/STAGE, or the `model` artifacts of a stage's MLflow run / its registered model
version) holds the EMA weights, the model config, the card of the dataset it trained on (its encoders and latent
statistics) and `sampling.json` (the stage's sampler settings and the latent statistics it normalised with;
older exports without it sample with the stage defaults and the card's statistics). A prompt is encoded with the
dataset's own text encoder, a latent drawn for one of the dataset's buckets, and decoded with its encoders.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from latentforge.training.batch import Batch, LatentNormalizer
from latentforge.training.config import TrainStageConfig

MODALITY_IDS = {"image": 0, "video": 1, "audio": 2}  # the DiT's modality embedding rows (sampling.MODALITY_NAMES)
VISUAL_BUCKET = re.compile(r"(\d+)x(\d+)x(\d+)")
AUDIO_BUCKET = re.compile(r"(\d+)samples@(\d+)Hz")
SAMPLING = "sampling.json"


@dataclass
class Export:
    """A stage's exported model, ready to sample from."""

    model: torch.nn.Module
    card: dict
    stage: TrainStageConfig
    normalizer: LatentNormalizer

    def buckets(self, modality: str) -> list[str]:
        """The dataset's buckets this modality can be drawn at, most samples first."""
        counts = Counter(self.card.get("buckets") or {})
        fits = [b for b, _ in counts.most_common()
                if (AUDIO_BUCKET.fullmatch(b) if modality == "audio" else
                    (m := VISUAL_BUCKET.fullmatch(b)) and (int(m[1]) == 1) == (modality == "image"))]
        return fits


def sampling_record(stage: TrainStageConfig, cards: list[dict]) -> dict:
    """What an export records for sampling: the stage's settings and the latent statistics it trained with
    (merged over its datasets, as the loader merges them)."""
    from latentforge.datasets.compat import merged_latent_stats

    stats = merged_latent_stats(cards) if len(cards) > 1 else cards[0]["latent_stats"]
    return {"stage": json.loads(stage.model_dump_json()), "latent_stats": stats}


def load_export(directory: str | Path, device: str = "cpu", dataset: str | Path | None = None) -> Export:
    """A stage export; or, with `dataset` (the dataset directory it trained on, for its card), a training
    checkpoint directory (its EMA weights; sampler settings then the stage defaults unless given)."""
    from safetensors.torch import load_file

    from latentforge.training.checkpoint import EMA, fit_repa
    from latentforge.training.dit import DiT, DiTConfig

    directory = Path(directory)
    checkpoint = dataset is not None
    needed = ("model_config.json", EMA) if checkpoint else ("model.safetensors", "model_config.json",
                                                            "dataset_card.json")
    missing = [n for n in needed if not (directory / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{directory} is not a {'training checkpoint' if checkpoint else 'stage export'}: {', '.join(missing)} "
            "missing (an export is WORKDIR/exports/STAGE or a stage run's `model` artifacts; a checkpoint, "
            "given with the dataset it trained on, a checkpoint_* directory of the stage's run)")
    if checkpoint:
        from latentforge.datasets.manifest import Dataset

        card = Dataset(dataset).card
    else:
        card = json.loads((directory / "dataset_card.json").read_text())
    record = json.loads((directory / SAMPLING).read_text()) if (directory / SAMPLING).is_file() else {}
    stage = TrainStageConfig.model_validate(record.get("stage") or {"name": "export", "modalities": ["image"]})
    model = DiT(DiTConfig.from_dict(json.loads((directory / "model_config.json").read_text())))
    weights = directory / (EMA if checkpoint else "model.safetensors")  # an export's weights are the EMA's
    model.load_state_dict(fit_repa(load_file(str(weights)), model))
    normalizer = LatentNormalizer({"latent_stats": record.get("latent_stats") or card["latent_stats"]})
    return Export(model.to(device).eval(), card, stage, normalizer)


def latent_shape(export: Export, modality: str, bucket: str, visual, audio) -> tuple[int, int, int, int]:
    """(C, T, H, W) of a latent for `bucket` (a name from the card, e.g. 1x32x32, 4x32x32, 8000samples@8000Hz)."""
    if modality == "audio":
        found = AUDIO_BUCKET.fullmatch(bucket)
        if not found:
            raise ValueError(f"bucket {bucket!r} is not an audio bucket (NsamplesSRHz, e.g. 8000samples@8000Hz)")
        # the encoder's own arithmetic, on silence of that length (the DCT frames are free; a VAE costs one pass)
        return tuple(audio.encode(np.zeros((1, int(found[1])), np.float32)).shape[1:])
    found = VISUAL_BUCKET.fullmatch(bucket)
    if not found:
        raise ValueError(f"bucket {bucket!r} is not a visual bucket (TxHxW, e.g. 1x32x32)")
    frames, height, width = map(int, found.groups())
    if (frames == 1) != (modality == "image"):
        raise ValueError(f"bucket {bucket!r} has {frames} frames: not a{'n' * (modality == 'image')} {modality} "
                         "bucket")
    return tuple(visual.latent_shape(frames, height, width))


def generate_from_prompts(export: Export, prompts: list[str], out_dir: str | Path, modality: str = "image",
                          bucket: str | None = None, steps: int | None = None, cfg_scale: float | None = None,
                          sampler: str | None = None, seed: int = 0, scale: int | None = None) -> list[Path]:
    """One sample per prompt, written as PNG (image), GIF (video) or WAV (audio) under `out_dir`, with the prompt
    beside it in a .txt; images and videos also in one labelled contact sheet (`grid.png`, first frames).
    Unset settings come from the stage that trained the export. Returns the files written."""
    from latentforge.datasets.encoders import build_text_encoder, decoders_from_card
    from latentforge.datasets.encoders.config import TextEncoderConfig
    from latentforge.training.flow import resolution_shift
    from latentforge.training.loader import token_count
    from latentforge.training.sampling import _label, contact_sheet, generate

    if modality not in MODALITY_IDS:
        raise ValueError(f"unknown modality {modality!r}: expected {', '.join(MODALITY_IDS)}")
    if not prompts:
        raise ValueError("no prompt given")
    available = export.buckets(modality)
    if bucket is None:
        if not available:
            raise ValueError(f"the dataset this model trained on has no {modality} bucket "
                             f"(it has {', '.join(sorted(export.card.get('buckets') or {})) or 'none'})")
        bucket = available[0]
    family = LatentNormalizer.family(modality)
    if family not in export.normalizer.stats:
        raise ValueError(f"the dataset this model trained on has no {family} latents (no statistics to decode with)")
    visual, audio = decoders_from_card(export.card)
    shape = latent_shape(export, modality, bucket, visual, audio)
    device = next(export.model.parameters()).device
    text_cfg = TextEncoderConfig.model_validate({**export.card["config"]["encoders"]["text"], "device": device.type})
    text, mask = build_text_encoder(text_cfg).encode(list(prompts))
    stage = export.stage
    shift = stage.timestep_shift
    if shift == "auto":
        shift = resolution_shift(token_count(shape, export.model.cfg.visual_patch))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, sheet = [], []
    for i, caption in enumerate(prompts):
        prompt = Batch(torch.zeros((1, *shape)), torch.from_numpy(text[i:i + 1]), torch.from_numpy(mask[i:i + 1]),
                       torch.tensor([MODALITY_IDS[modality]]), [caption])
        with torch.no_grad():
            latent = generate(export.model, prompt.to(device), steps or stage.sample_steps,
                              stage.cfg_scale if cfg_scale is None else cfg_scale, seed + i,
                              sampler or stage.sampler, shift)
        latent = export.normalizer.denormalize(latent[0].float().cpu().numpy(), modality)
        stem = out / f"{i:02d}_{modality}"
        stem.with_suffix(".txt").write_text(caption + "\n")
        path, first = _write_sample(latent, modality, stem, visual, audio, scale)
        written += [stem.with_suffix(".txt"), path]
        if first is not None:
            sheet.append(_label(first, caption))
    if sheet:
        written.append(contact_sheet(sheet, out / "grid.png"))
    return written


def _write_sample(latent: np.ndarray, modality: str, stem: Path, visual, audio, scale: int | None):
    """One decoded sample as `stem`.png / .gif / .wav; returns its path and, for pictures, the first (enlarged)."""
    import soundfile as sf

    from latentforge.training.sampling import _upscale

    if modality == "audio":
        wave = audio.decode(latent[None])[0]
        sf.write(stem.with_suffix(".wav"), np.clip(wave, -1, 1), audio.sample_rate)
        return stem.with_suffix(".wav"), None
    frames = visual.decode(latent[None])[0]  # (T, H, W, 3) uint8
    factor = scale or max(1, 256 // max(frames.shape[1:3]))  # tiny demo buckets: big enough to look at
    pictures = [_upscale(f, factor) for f in frames]
    if modality == "image":
        pictures[0].save(stem.with_suffix(".png"))
        return stem.with_suffix(".png"), pictures[0]
    pictures[0].save(stem.with_suffix(".gif"), save_all=True, append_images=pictures[1:], duration=250, loop=0)
    return stem.with_suffix(".gif"), pictures[0]
