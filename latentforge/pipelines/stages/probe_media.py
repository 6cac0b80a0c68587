"""Probe each file with a real decoder (PIL, decord -> PyAV, soundfile) and record what it is."""
from __future__ import annotations

from latentforge.datasets import media
from latentforge.pipelines.resources import StageResources
from latentforge.pipelines.stage import Reject, Stage
from latentforge.pipelines.stages.dedup import KEY_GREY, grey_thumbnail


class ProbeMedia(Stage):
    """Also leaves KEY_GREY, the near-duplicate hash's view of an image or a video's middle frame, decoded by
    the probe anyway: ContentHash then does not open the file a second time (for a video a decord open and
    seek cost more CPU than the probe's three frames, bench/decode.py; an image is decoded once, at the
    hash's reduced JPEG scale, bench/probe_images.py)."""

    name = "probe"
    resources = StageResources(num_cpus=0.5, batch_size=8, pool=2)
    outputs = {"modality": "", "width": 0, "height": 0, "num_frames": 0, "fps": 0.0,
               "duration_s": 0.0, "sample_rate": 0, "decoder": "", KEY_GREY: b""}

    def process_row(self, row: dict) -> dict:
        dedup = getattr(self.cfg, "dedup", None)  # a stage config without one (tests) hashes nothing
        hashing = dedup is not None and dedup.enabled
        try:
            info = media.probe(row["uri"], max_pixels=self.cfg.filters.max_pixels,
                               timeout_s=self.cfg.decode_timeout_s,
                               thumb_side=4 * dedup.hash_size if hashing else None)
        except media.MediaError as e:
            raise Reject(e.reason, str(e)) from e
        wants_key = info.key_frame is not None and hashing
        return {"modality": info.modality, "width": info.width, "height": info.height,
                "num_frames": info.num_frames, "fps": float(info.fps), "duration_s": float(info.duration_s),
                "sample_rate": info.sample_rate, "decoder": info.decoder,
                KEY_GREY: grey_thumbnail(info.key_frame, dedup.hash_size).tobytes() if wants_key else b""}
