"""REPA features: the token rule, a tiny random-weight DINOv2 loaded by local directory, the stage as a plain
callable on a small batch of real media."""
from __future__ import annotations

import numpy as np
import pytest
from lf_batches import to_batch
from tiny_dinov2 import DIM, ENCODER_PATCH, save_tiny_dinov2

from latentforge.datasets.demo_corpus import DemoCorpusSpec, generate_demo_corpus
from latentforge.datasets.shards import load_npy
from latentforge.pipelines.config import CurationConfig
from latentforge.pipelines.stages.encode_repa import EncodeRepa, RepaFeatures, input_grid, token_grid

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def repa_cfg(model: str, **extra) -> dict:
    return {"model": model, "device": "cpu", "dtype": "float32", "patch": 2, **extra}


def test_token_grid_is_the_dits_patch_grid():
    assert token_grid([12, 5, 8, 16], patch=2, temporal_patch=1) == (5, 4, 8)
    assert token_grid([4, 4, 32, 32], patch=2, temporal_patch=2) == (2, 16, 16)
    assert input_grid((16, 32), max_cells=16) == (8, 16)  # capped: aspect kept, resized up afterwards
    assert input_grid((4, 8), max_cells=74) == (4, 8)
    with pytest.raises(ValueError, match="no whole"):
        token_grid([12, 1, 1, 8], patch=2, temporal_patch=1)


@pytest.mark.parametrize("registers", [0, 2])
def test_features_have_one_row_per_token(tmp_path, registers):
    from latentforge.datasets.encoders.config import RepaEncoderConfig

    enc = RepaFeatures(RepaEncoderConfig(**repa_cfg(save_tiny_dinov2(tmp_path, registers))))
    assert (enc.dim, enc.encoder_patch, enc.skip) == (DIM, ENCODER_PATCH, 1 + registers)
    frames = np.random.default_rng(0).integers(0, 255, (3, 12, 20, 3), dtype=np.uint8)
    assert enc.input_size((3, 5)) == (12, 20)
    out = enc(frames, (3, 5))
    assert out.shape == (3 * 3 * 5, DIM) and out.dtype == np.float16 and np.isfinite(out).all()
    assert not np.allclose(out[:15], out[15:30])  # each key frame has its own features
    capped = RepaFeatures(RepaEncoderConfig(**repa_cfg(str(tmp_path), max_input_side=16)))
    assert capped.input_size((3, 5)) == (8, 16)  # 2 x 4 encoder patches, resized up to 3 x 5 tokens
    assert capped(frames[:, :8, :16], (3, 5)).shape == (3 * 15, DIM)


def test_stage_adds_repa_to_visual_rows_only(tmp_path):
    corpus = tmp_path / "corpus"
    entries = generate_demo_corpus(corpus, DemoCorpusSpec(num_images=1, num_videos=1, num_audio=1,
                                                          include_broken=False))["files"]
    by_modality = {e["modality"]: str(corpus / e["path"]) for e in entries}
    cfg = CurationConfig.model_validate({"input_dir": str(corpus), "encoders": {
        "repa": repa_cfg(save_tiny_dinov2(tmp_path / "dino"))}})
    assert EncodeRepa.enabled(cfg) and not EncodeRepa.enabled(CurationConfig())
    shapes = {"image": [12, 1, 8, 12], "video": [12, 3, 8, 8], "audio": [64, 16, 1, 1]}
    batch = to_batch([{"id": m, "uri": by_modality[m], "modality": m, "latent_shape": shapes[m], "clip_index": -1,
                       "status": "ok", "reason": "", "message": "", "stage": ""} for m in shapes])
    out = EncodeRepa(cfg)(batch)
    assert list(out["status"]) == ["ok"] * 3, list(out["message"])
    image, video, audio = (load_npy(b) if b else None for b in out["repa"])
    assert image.shape == (1 * 4 * 6, DIM) and video.shape == (3 * 4 * 4, DIM) and audio is None
    assert image.dtype == np.float16
    desc = __import__("json").loads(out["repa_encoder"][0])
    assert desc["kind"] == "dinov2" and desc["dim"] == DIM and desc["patch"] == 2 and "tokens_rule" in desc
