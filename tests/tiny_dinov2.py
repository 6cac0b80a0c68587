"""A tiny random-weight DINOv2 (optionally with registers) saved with its image processor; nothing downloaded."""
from __future__ import annotations

from pathlib import Path

DIM, ENCODER_PATCH = 24, 4


def save_tiny_dinov2(root: Path, registers: int = 0) -> str:
    from transformers import (
        BitImageProcessor,
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    common = {"hidden_size": DIM, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
              "patch_size": ENCODER_PATCH, "image_size": 16}
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **common))
    else:
        model = Dinov2Model(Dinov2Config(**common))
    model.save_pretrained(str(root))
    BitImageProcessor(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(str(root))
    return str(root)
