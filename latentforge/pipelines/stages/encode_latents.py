"""Decode media at the bucket size and encode it with the embedded invertible codecs."""
from __future__ import annotations

import numpy as np

from latentforge.datasets import media
from latentforge.datasets.codec import DctAudioCodec, HaarPixelCodec
from latentforge.datasets.manifest import channel_stats
from latentforge.datasets.shards import npy_bytes
from latentforge.pipelines.config import CurationConfig, StageResources
from latentforge.pipelines.stage import Reject, Stage


def bucket_name(shape: tuple[int, ...]) -> str:
    return "x".join(str(int(s)) for s in shape)


class EncodeLatents(Stage):
    name = "encode_latents"
    resources = StageResources(num_cpus=0.5, batch_size=8, pool=2)
    outputs = {"latent": b"", "latent_shape": [], "bucket": "", "lat_stats": b""}

    def __init__(self, cfg: CurationConfig):
        super().__init__(cfg)
        self.pixel = HaarPixelCodec()
        self.audio = DctAudioCodec(frame=cfg.codec.audio_frame)

    def process_row(self, row: dict) -> dict:
        try:
            latent = self.encode(row)
        except media.MediaError as e:
            raise Reject(e.reason, str(e)) from e
        return {"latent": npy_bytes(latent), "latent_shape": list(latent.shape), "bucket": bucket_name(latent.shape),
                "lat_stats": npy_bytes(channel_stats(latent))}

    def encode(self, row: dict) -> np.ndarray:
        size = (self.cfg.image_size, self.cfg.image_size)
        if row["modality"] == "image":
            return self.pixel.encode(media.decode_image(row["uri"], size)[None])
        if row["modality"] == "video":
            frames, _ = media.decode_video(row["uri"], self.cfg.video_frames, size,
                                           timeout_s=self.cfg.decode_timeout_s)
            return self.pixel.encode(frames)
        if row["modality"] == "audio":
            return self.audio.encode(media.decode_audio(row["uri"], self.cfg.audio_sample_rate, self.audio_samples))
        raise Reject("unsupported_modality", f"no latent codec for modality {row['modality']!r}")

    @property
    def audio_samples(self) -> int:
        frame = self.cfg.codec.audio_frame
        n = int(round(self.cfg.audio_sample_rate * self.cfg.audio_seconds))
        return max(frame, n - n % frame)
