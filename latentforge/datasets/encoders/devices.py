"""Device and dtype names of model configs ("auto", "cuda", "bfloat16", ...) as torch objects.

A module of its own so stage modules can name these without importing diffusers (pretrained.py does, at its
top): Ray Data task workers import the stage modules, and diffusers costs seconds there."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def resolve_device(device: str) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)
