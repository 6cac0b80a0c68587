"""What the GPU test modules share: the device they run on (LF_GPU_TESTS_DEVICE, see test_cuda.py), their marks,
and the checks of where a model's parameters are and how close two results are."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

DEVICE = os.environ.get("LF_GPU_TESTS_DEVICE", "cuda")
if DEVICE not in ("cuda", "cpu"):
    raise ValueError(f"LF_GPU_TESTS_DEVICE={DEVICE!r}: expected 'cuda' or 'cpu'")
ON_CUDA = DEVICE == "cuda"

GPU_MARKS = [  # every module's pytestmark: the `gpu` marker, and a skip where no CUDA device is seen
    pytest.mark.gpu,
    pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(),
                       reason=f"no CUDA device (torch {torch.__version__}); "
                              "LF_GPU_TESTS_DEVICE=cpu runs these bodies on the CPU"),
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
]


def device_option(name: str) -> str:
    """A config's device option: "auto" and "cuda" as given on CUDA; "cpu" when the tests run on the CPU."""
    return name if ON_CUDA else "cpu"


def auto_dtype(gpu_dtype: torch.dtype) -> torch.dtype:
    """What dtype "auto" must resolve to here: the documented GPU dtype on CUDA, float32 on the CPU."""
    return gpu_dtype if ON_CUDA else torch.float32


def assert_params(model: torch.nn.Module, dtype: torch.dtype, keep_fp32: tuple[str, ...] = ()) -> None:
    """Every parameter on DEVICE; floating ones in `dtype` (modules a model class may keep in float32 in either)."""
    wrong = {}
    for name, p in model.named_parameters():
        want = {dtype, torch.float32} if any(f".{k}." in f".{name}" for k in keep_fp32) else {dtype}
        if p.device.type != DEVICE or (p.is_floating_point() and p.dtype not in want):
            wrong[name] = (p.device.type, p.dtype)
    assert not wrong, f"expected {DEVICE} / {dtype}; {len(wrong)} differ, e.g. {list(wrong.items())[:3]}"


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))
