"""Decode media into its bucket (aspect-preserving resize, centre crop) and encode latents per bucket batch."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np

from latentforge.datasets import audio, media, video
from latentforge.datasets.buckets import Bucket, choose_bucket
from latentforge.datasets.encoders import build_audio_encoder, build_visual_encoder
from latentforge.datasets.manifest import channel_stats
from latentforge.datasets.shards import npy_bytes
from latentforge.datasets.video import decode_clip
from latentforge.pipelines.resources import StageResources
from latentforge.pipelines.stage import Reject, Stage

if TYPE_CHECKING:
    from latentforge.pipelines.config import CurationConfig


def check_buckets(cfg: CurationConfig, visual) -> None:
    """Refuse, before any work, a bucket the visual encoder cannot take (size multiple, frame rule)."""
    for b in cfg.bucket_table():
        visual.check_size(b.height, b.width, 1)
        visual.check_size(b.height, b.width, b.frames)


def shape_text(shape) -> str:
    """A latent shape as the pipeline carries it: JSON text, e.g. "[4, 1, 32, 32]".

    A list column would reach Arrow as lists in some blocks and as a fixed-shape tensor in others (a block
    whose rows all have one shape), and Ray Data's shuffle before the shard write then fails with "Found
    columns with both objects and tensors"; a string column has one Arrow type everywhere.
    """
    return json.dumps([int(s) for s in shape])


def parse_shape(value) -> list[int]:
    """The inverse of shape_text; lists and arrays (manifest rows) pass through as ints."""
    return [int(s) for s in (json.loads(value) if isinstance(value, str) else value)]


class EncodeLatents(Stage):
    name = "encode_latents"
    resources = StageResources(num_cpus=0.5, batch_size=8, pool=2)
    outputs = {"latent": b"", "latent_shape": "", "bucket": "", "lat_stats": b"", "latent_encoder": "",
               "_pixels": None}

    def __init__(self, cfg: CurationConfig):
        super().__init__(cfg)
        self.visual = build_visual_encoder(cfg.encoders.visual)
        self.audio = build_audio_encoder(cfg.encoders.audio, cfg.audio_sample_rate)
        self.buckets = cfg.bucket_table()
        check_buckets(cfg, self.visual)
        self.descriptions = {e.family: json.dumps(e.describe(), sort_keys=True) for e in (self.visual, self.audio)}

    def __call__(self, batch):
        # Decode row by row (a bad file costs one row), then encode one batch per bucket.
        decoded = super().__call__(batch)
        groups: dict[tuple, list[int]] = {}
        for i, status in enumerate(decoded["status"]):
            if status == "ok":
                groups.setdefault((decoded["modality"][i], decoded["bucket"][i]), []).append(i)
        pixels = decoded.pop("_pixels")
        for (modality, _), idx in groups.items():
            encoder = self.audio if modality == "audio" else self.visual
            try:
                latents = encoder.encode(np.stack([pixels[i] for i in idx]))
            except Exception as e:  # one failing bucket batch is rejected with its reason, the rest go on
                for i in idx:
                    decoded["status"][i], decoded["reason"][i] = "rejected", "encode_error"
                    decoded["stage"][i] = self.name
                    decoded["message"][i] = f"{type(e).__name__}: {e}"
                continue
            for i, latent in zip(idx, latents):
                decoded["latent"][i] = npy_bytes(latent.astype(np.float32))
                decoded["latent_shape"][i] = shape_text(latent.shape)
                decoded["lat_stats"][i] = npy_bytes(channel_stats(latent))
                decoded["latent_encoder"][i] = self.descriptions[encoder.family]
        return decoded

    def process_row(self, row: dict) -> dict:
        try:
            bucket, pixels = self.decode(row)
        except media.MediaError as e:
            raise Reject(e.reason, str(e)) from e
        return {"bucket": bucket, "_pixels": pixels}

    def decode(self, row: dict) -> tuple[str, np.ndarray]:
        modality = row["modality"]
        if modality not in ("image", "video", "audio"):
            raise Reject("unsupported_modality", f"no latent encoder for modality {modality!r}")
        if modality == "audio":
            n = self.audio.valid_samples(int(round(self.audio.sample_rate * self.cfg.audio_seconds)))
            return f"{n}samples@{self.audio.sample_rate}Hz", audio.decode_audio(row["uri"], self.audio.sample_rate, n)
        clip = int(row.get("clip_index", -1)) >= 0
        available = int(row["num_frames"])
        if clip:  # a clip of a longer video: only its own span counts
            available = int(round((row["clip_end_s"] - row["clip_start_s"]) * float(row["fps"] or 1.0)))
        b: Bucket = choose_bucket(self.buckets, int(row["width"]), int(row["height"]), available, modality)
        size = (b.height, b.width)
        if modality == "image":
            return b.name(modality), media.decode_image(row["uri"], size)[None]
        n = self.visual.valid_frames(b.frames)
        if clip:
            frames, _ = decode_clip(row["uri"], float(row["clip_start_s"]), float(row["clip_end_s"]), n, size,
                                    self.cfg.decode_timeout_s)
        else:
            frames, _ = video.decode_video(row["uri"], n, size, timeout_s=self.cfg.decode_timeout_s)
        return b.name(modality), frames
