"""Samples at the end of a stage: generate from captions, decode latents back to PNG / GIF / WAV."""
from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from latentforge.datasets.encoders import AudioEncoder, PixelEncoder
from latentforge.training.flow import sample
from latentforge.training.loader import Batch, LatentNormalizer

MODALITY_NAMES = {0: "image", 1: "video", 2: "audio"}


def pick_prompts(batches: list[Batch], count: int) -> list[Batch]:
    """Up to `count` single-sample prompts with distinct captions, taken from each bucket in turn."""
    by_bucket: dict[tuple, list[Batch]] = {}
    for batch in batches:
        for i, caption in enumerate(batch.captions):
            one = Batch(batch.latent[i:i + 1], batch.text[i:i + 1], batch.text_mask[i:i + 1],
                        batch.modality[i:i + 1], [caption])
            by_bucket.setdefault(tuple(batch.latent.shape[1:]), []).append(one)
    queues = [by_bucket[k] for k in sorted(by_bucket)]
    seen, out = set(), []
    while len(out) < count and any(queues):
        for queue in queues:
            while queue and queue[0].captions[0] in seen:
                queue.pop(0)
            if queue and len(out) < count:
                seen.add(queue[0].captions[0])
                out.append(queue.pop(0))
    return out


def generate(model, prompt: Batch, steps: int, cfg_scale: float, seed: int, method: str = "euler",
             timestep_shift: float | None = None) -> torch.Tensor:
    """One latent from the prompt's caption, on the model's device (the noise is drawn there, from `seed`),
    on the time grid the stage trained with (`timestep_shift`)."""
    prompt = prompt.to(next(model.parameters()).device)
    generator = torch.Generator().manual_seed(seed)
    return sample(model, tuple(prompt.latent.shape), prompt.text, prompt.text_mask, prompt.modality,
                  method=method, steps=steps, cfg_scale=cfg_scale, generator=generator, timestep_shift=timestep_shift)


def _label(image: Image.Image, text: str) -> Image.Image:
    """The image under its caption, wrapped to the image's width (PIL's default font is ~6 px a character)."""
    lines = textwrap.wrap(text, width=max(8, image.width // 6))[:4]
    top = 4 + 11 * len(lines)
    canvas = Image.new("RGB", (image.width + 8, image.height + top + 4), "white")
    canvas.paste(image, (4, top))
    ImageDraw.Draw(canvas).multiline_text((4, 2), "\n".join(lines), fill="black", spacing=1)
    return canvas


def _upscale(frame: np.ndarray, factor: int = 4) -> Image.Image:
    img = Image.fromarray(frame)
    return img.resize((img.width * factor, img.height * factor), Image.NEAREST)


def write_samples(model, prompts: list[Batch], normalizer: LatentNormalizer, visual: PixelEncoder,
                  audio: AudioEncoder, out_dir: Path, *, steps: int, cfg_scale: float, seed: int,
                  method: str = "euler", shift: Callable[[Batch], float | None] | None = None) -> list[Path]:
    """Generate one sample per prompt; images go in one PNG grid (real above generated), videos to GIFs,
    audio to WAVs. `shift(prompt)`: the timestep shift the stage trained that latent shape with. Returns the
    written files."""
    import soundfile as sf

    out_dir.mkdir(parents=True, exist_ok=True)
    written, grid = [], []
    for i, prompt in enumerate(prompts):
        modality = MODALITY_NAMES[int(prompt.modality[0])]
        fake = generate(model, prompt, steps, cfg_scale, seed + i, method, shift(prompt) if shift else None)
        fake = fake[0].float().cpu().numpy()
        real = prompt.latent[0].cpu().numpy()
        stem = f"{i:02d}_{modality}"
        if modality == "audio":
            wave = audio.decode(normalizer.denormalize(fake, "audio")[None])[0]
            path = out_dir / f"{stem}.wav"
            sf.write(path, np.clip(wave, -1, 1), audio.sample_rate)
            (out_dir / f"{stem}.txt").write_text(prompt.captions[0])
            written += [path, out_dir / f"{stem}.txt"]
            continue
        frames = visual.decode(normalizer.denormalize(fake, modality)[None])[0]
        truth = visual.decode(normalizer.denormalize(real, modality)[None])[0]
        if frames.shape[0] == 1:
            grid.append((truth[0], frames[0], prompt.captions[0]))
        else:
            path = out_dir / f"{stem}.gif"
            pics = [_label(_upscale(np.concatenate([t, f], axis=1)), prompt.captions[0])
                    for t, f in zip(truth, frames)]
            pics[0].save(path, save_all=True, append_images=pics[1:], duration=250, loop=0)
            written.append(path)
    if grid:
        written.append(_write_grid(grid, out_dir / "images.png"))
    return written


def _write_grid(items: list[tuple[np.ndarray, np.ndarray, str]], path: Path) -> Path:
    """Columns of (caption, real, generated) for image samples."""
    return contact_sheet([_label(_upscale(np.concatenate([real, fake], axis=0)), caption)
                          for real, fake, caption in items], path)


def contact_sheet(tiles: list[Image.Image], path: Path) -> Path:
    """The tiles side by side, top-aligned, on white."""
    width, height = sum(t.width for t in tiles), max(t.height for t in tiles)
    sheet = Image.new("RGB", (width, height), "white")
    x = 0
    for tile in tiles:
        sheet.paste(tile, (x, 0))
        x += tile.width
    sheet.save(path)
    return path
