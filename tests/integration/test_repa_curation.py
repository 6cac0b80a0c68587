"""A curation run on Ray with REPA features on (a tiny random-weight DINOv2 loaded by local directory): every
visual sample's shard entry carries repa.npy with one row per DiT token, and the card describes the encoder."""
from __future__ import annotations

import math

import numpy as np
import pytest
from tiny_dinov2 import DIM, save_tiny_dinov2

from latentforge.datasets.demo_corpus import DemoCorpusSpec, generate_demo_corpus
from latentforge.datasets.manifest import Dataset
from latentforge.datasets.shards import iter_shards
from latentforge.pipelines.config import CurationConfig
from latentforge.pipelines.curate import run_curation

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.heavy,  # ~1 min on a quiet 2-core machine
              pytest.mark.filterwarnings("ignore::FutureWarning")]


def test_curation_writes_repa_features_per_dit_token(tmp_path, ray_local):
    corpus = tmp_path / "corpus"
    generate_demo_corpus(corpus, DemoCorpusSpec(num_images=2, num_videos=1, num_audio=1, include_broken=False))
    cfg = CurationConfig.model_validate({
        "name": "repa", "input_dir": str(corpus), "samples_per_shard": 4, "audio_seconds": 0.25,
        "buckets": [{"height": 16, "width": 16, "frames": 3}, {"height": 16, "width": 32, "frames": 3}],
        "encoders": {"repa": {"model": save_tiny_dinov2(tmp_path / "dino"), "device": "cpu", "dtype": "float32",
                              "patch": 2}}})
    out = tmp_path / "dataset"
    result = run_curation(cfg, out)
    card = Dataset(out).card
    repa = card["encoders"]["repa"]
    assert {k: repa[k] for k in ("kind", "dim", "patch")} == {"kind": "dinov2", "dim": DIM, "patch": 2}
    assert repa["model"] == str(tmp_path / "dino") and "revision" in repa and repa["tokens_rule"]
    samples = list(iter_shards(sorted((out / "shards").glob("*.tar"))))
    assert len(samples) == result.kept
    seen = set()
    for s in samples:
        modality = s.meta["modality"]
        seen.add(modality)
        if modality == "audio":
            assert s.repa is None
            continue
        _, t, h, w = s.latent.shape
        assert s.repa.dtype == np.float16 and s.repa.shape == (t * (h // 2) * (w // 2), DIM)
        assert np.isfinite(s.repa).all() and math.prod(s.repa.shape) > 0
    assert seen == {"image", "video", "audio"}

    # The same shards feed a REPA stage through Ray Train: the projector exists only with REPA on, and it trains.
    import torch
    from safetensors.torch import load_file

    from latentforge.training.config import PlanConfig
    from latentforge.training.trainer import fit_stage

    plan = PlanConfig.model_validate({
        "model": {"preset": "DiT-T", "overrides": {"hidden": 64, "depth": 2, "visual_patch": 2}}, "num_workers": 1,
        "stages": [{"name": "repa", "modalities": ["image", "video"], "steps": 3, "batch_size": 2,
                    "checkpoint_every": 3, "log_every": 1, "num_samples": 0,
                    "repa": {"weight": 0.5, "depth": 1}}]})
    trained = fit_stage(plan, plan.stages[0], [out], tmp_path / "runs", "repa")
    weights = load_file(str(trained.checkpoint_dir / "model.safetensors"))
    projector = {k: v for k, v in weights.items() if k.startswith("repa_projector.")}
    assert projector and all(torch.isfinite(v).all() for v in projector.values())
    assert projector[max(projector)].shape[0] == DIM  # the projector maps to the card's feature width
    assert torch.isfinite(torch.tensor(trained.metrics["loss"]))
