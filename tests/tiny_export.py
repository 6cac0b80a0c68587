"""A stage export as export_weights writes it, for a tiny DiT with random weights (tests of `generate`)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from latentforge.training.config import TrainStageConfig
from latentforge.training.dit import DiT, DiTConfig
from latentforge.training.generate import sampling_record

WORDS = "a an the red green blue yellow small big circle square triangle dot moving low high tone hum on of".split()
TEXT_DIM = 32


def card(text_model: str) -> dict:
    return {
        "id": "demo-1", "name": "demo",
        "buckets": {"1x8x8": 2, "1x16x16": 5, "4x16x16": 3, "2048samples@8000Hz": 2},
        "encoders": {"visual": {"channels": 12}, "audio": {"channels": 64, "sample_rate": 8000},
                     "text": {"dim": TEXT_DIM, "max_len": 16}},
        "config": {"encoders": {"visual": {"kind": "haar"}, "audio": {"kind": "dct_frames", "frame": 64},
                                "text": {"kind": "t5", "model": text_model, "max_len": 16}}},
        "latent_stats": {"visual": {"mean": [0.0] * 12, "std": [1.0] * 12},
                         "audio": {"mean": [0.0] * 64, "std": [1.0] * 64}},
    }


def save_tiny_text_model(root: Path) -> str:
    """A 2-layer T5 encoder with a word-level BERT tokenizer of WORDS, built here (the packaged MiniLM is 88 MB,
    more than a device check carries)."""
    from transformers import BertTokenizer, T5Config, T5EncoderModel

    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizer(str(root / "vocab.txt"))
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2,
                            num_heads=4)).save_pretrained(str(root))
    tokenizer.save_pretrained(str(root))
    return str(root)


def save_tiny_export(root: Path) -> Path:
    """Random weights everywhere: a freshly initialised DiT's zeroed output layers would ignore the prompt. The
    stage samples with 3 heun steps at guidance 1.5."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    dataset = card(save_tiny_text_model(root / "text"))
    cfg = DiTConfig.from_dict({"hidden": 32, "depth": 1, "heads": 2, "visual_channels": 12, "audio_channels": 64,
                               "text_dim": TEXT_DIM, "max_text_len": 16})
    torch.manual_seed(0)
    model = DiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "model.safetensors"))
    (root / "model_config.json").write_text(json.dumps(cfg.to_dict()))
    (root / "dataset_card.json").write_text(json.dumps(dataset))
    stage = TrainStageConfig(name="finetune", modalities=["image", "video", "audio"], sample_steps=3, cfg_scale=1.5,
                             sampler="heun")
    (root / "sampling.json").write_text(json.dumps(sampling_record(stage, [dataset])))
    return root
