"""REPA wired into the loop: repa.npy features collated from real shards, the projector trained through
train_step (the loop's own step), the loss logged; a stage asking for REPA without features is refused."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from latentforge.datasets import manifest as mf
from latentforge.datasets.manifest import Dataset
from latentforge.datasets.shards import LatentSample, LatentShardWriter
from latentforge.training.config import TrainStageConfig
from latentforge.training.dit import DiT, DiTConfig
from latentforge.training.flow import align_repa_targets
from latentforge.training.loader import LatentNormalizer, build_stream, rank_plan
from latentforge.training.loop import build_accelerator, stage_model, step_generator, train_step
from latentforge.training.metrics import MODALITY_LOSSES, Meter

MODEL = {"hidden": 32, "depth": 2, "heads": 2, "visual_channels": 4, "text_dim": 8, "max_text_len": 4,
         "mixer_depth": 1}


def write_dataset(root: Path, repa_tokens: int | None) -> Dataset:
    """12 images of 4x1x8x8 latents (16 DiT tokens at patch 2); repa.npy (tokens, 6) when repa_tokens is set."""
    rng = np.random.default_rng(0)
    rows, name = [], "shard-000000-00.tar"
    with LatentShardWriter(root / mf.SHARDS / name) as writer:
        for i in range(12):
            key = f"s{i:03d}"
            repa = None if repa_tokens is None else rng.standard_normal((repa_tokens, 6)).astype(np.float16)
            writer.write_sample(LatentSample(key, rng.standard_normal((4, 1, 8, 8)).astype(np.float32),
                                             rng.standard_normal((4, 8)).astype(np.float32), np.arange(4) < 3,
                                             f"caption {i}", {"modality": "image"}, repa=repa))
            rows.append({"id": key, "modality": "image", "latent_shape": [4, 1, 8, 8], "shard": name, "status": "ok"})
    mf.write_table(mf.to_table(rows, mf.MANIFEST_SCHEMA), root / mf.MANIFEST)
    encoders = {} if repa_tokens is None else {"repa": {"kind": "dinov2", "model": "random", "dim": 6,
                                                        "tokens": repa_tokens}}
    (root / mf.CARD).write_text(json.dumps({"encoders": encoders, "latent_stats": {
        "visual": {"mean": [0.0] * 4, "std": [1.0] * 4, "count": 1}}}))
    return Dataset(root)


def stage(**kw) -> TrainStageConfig:
    return TrainStageConfig(name="r", modalities=["image"], batch_size=4, cond_dropout=0.2,
                            loader={"workers": 0}, repa={"weight": 0.5, "depth": 1}, **kw)


@pytest.mark.parametrize("repa_tokens,mask_ratio", [(16, 0.0), (4, 0.5)])  # exact tokens; a 2x2 grid resized
def test_a_stage_with_repa_trains_the_projector_and_logs_its_loss(tmp_path, repa_tokens, mask_ratio) -> None:
    ds = write_dataset(tmp_path / "ds", repa_tokens)
    st = stage(mask_ratio=mask_ratio)
    cfg = DiTConfig.from_dict(stage_model(MODEL, st, [ds]))
    assert (cfg.repa_depth, cfg.repa_dim) == (1, 6)  # depth from the stage, width from the card
    torch.manual_seed(0)
    model = DiT(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    acc = build_accelerator(st)
    model, optimizer = acc.prepare(model, optimizer)
    stream = build_stream(rank_plan(ds, st, LatentNormalizer(ds.card), seed=0, world=1, repa=True), 0)
    projector = acc.unwrap_model(model).repa_projector
    meter, repa_losses = Meter(("train/repa_loss", *MODALITY_LOSSES)), []
    for step in range(12):
        loss, seen, extra = train_step(acc, model, stream, st, step_generator(0, 0, step), cfg.visual_patch)
        assert seen == 4 and np.isfinite(loss) and np.isfinite(extra["train/repa_loss"])
        assert -1.0 <= extra["train/repa_loss"] <= 1.0  # minus a cosine similarity
        grads = [p.grad for p in projector.parameters()]
        assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.update(loss, seen, extra)
        repa_losses.append(extra["train/repa_loss"])
    assert "train/repa_loss" in meter.flush()
    assert np.mean(repa_losses[-4:]) < np.mean(repa_losses[:4])  # the projector learns to align


def test_repa_targets_line_up_with_the_token_grid() -> None:
    feats = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    assert align_repa_targets(feats, (1, 2, 2)) is feats  # N equal to the token count: as is
    grown = align_repa_targets(feats, (1, 4, 4))  # a 2x2 grid per frame resized to the 4x4 token grid
    assert grown.shape == (2, 16, 3)
    torch.testing.assert_close(grown.mean(1), feats.mean(1))  # bilinear 2x upsampling keeps the mean
    with pytest.raises(ValueError, match="REPA features have 4 tokens; the latent has 3x2x2 = 12 tokens"):
        align_repa_targets(feats, (3, 2, 2))


def test_a_stage_asking_for_repa_without_features_is_refused(tmp_path) -> None:
    ds = write_dataset(tmp_path / "plain", None)
    with pytest.raises(ValueError, match="stage 'r' sets `repa`, but dataset .* has no REPA features"):
        stage_model(MODEL, stage(), [ds])
    with pytest.raises(ValueError, match="repa.depth=3 exceeds the model depth 2"):
        stage_model(MODEL, TrainStageConfig(name="r", modalities=["image"], repa={"depth": 3}), [ds])
    assert stage_model(MODEL, TrainStageConfig(name="r", modalities=["image"]), [ds])["repa_dim"] == 0
