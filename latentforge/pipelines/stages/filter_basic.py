"""Basic quality scores (resolution, duration, sample rate); thresholds in config decide `keep`."""
from __future__ import annotations

from latentforge.pipelines.resources import StageResources
from latentforge.pipelines.stage import Stage


def basic_scores(row: dict) -> dict:
    visual = row["modality"] in ("image", "video")
    timed = row["modality"] in ("video", "audio")
    return {
        "score_resolution": float(min(row["width"], row["height"])) if visual else 0.0,
        "score_duration": float(row["duration_s"]) if timed else 0.0,
        "score_sample_rate": float(row["sample_rate"]) if row["modality"] == "audio" else 0.0,
    }


class FilterBasic(Stage):
    name = "filter_basic"
    resources = StageResources(num_cpus=0.25, batch_size=32, pool=1)
    outputs = {"score_resolution": 0.0, "score_duration": 0.0, "score_sample_rate": 0.0}

    def __call__(self, batch):
        # Scores are written for every probed row, the verdict afterwards, so a filtered row keeps its scores.
        scored = super().__call__(batch)
        return self._verdicts(scored)

    def process_row(self, row: dict) -> dict:
        return basic_scores(row)

    def _verdicts(self, batch):
        f = self.cfg.filters
        for i, status in enumerate(batch["status"]):
            if status != "ok":
                continue
            verdict = self._verdict(batch["modality"][i], batch["score_resolution"][i], batch["score_duration"][i],
                                    batch["score_sample_rate"][i], batch["num_frames"][i], f)
            if verdict:
                batch["status"][i], batch["stage"][i] = "filtered", self.name
                batch["reason"][i], batch["message"][i] = verdict
        return batch

    @staticmethod
    def _verdict(modality, resolution, duration, sample_rate, frames, f) -> tuple[str, str] | None:
        if modality in ("image", "video") and resolution < f.min_side:
            return "resolution_below_min", f"smallest side {resolution:.0f}px < {f.min_side}px"
        if modality == "video" and frames < f.min_frames:
            return "too_few_frames", f"{frames} frames < {f.min_frames}"
        if modality in ("video", "audio") and duration < f.min_duration_s:
            return "duration_below_min", f"{duration:.3f}s < {f.min_duration_s}s"
        if modality == "audio" and sample_rate < f.min_sample_rate:
            return "sample_rate_below_min", f"{sample_rate:.0f} Hz < {f.min_sample_rate} Hz"
        return None
