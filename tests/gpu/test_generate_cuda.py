"""`latentforge generate` on CUDA: the model and the prompt's text encoder on the device, the pictures those of
the CPU's up to rounding (the noise is drawn on the CPU from the seed, then moved). See test_cuda.py for
LF_GPU_TESTS_DEVICE."""
from __future__ import annotations

import numpy as np
from lf_gpu import DEVICE, GPU_MARKS
from PIL import Image
from tiny_export import save_tiny_export

from latentforge.training.generate import generate_from_prompts, load_export

pytestmark = GPU_MARKS


def test_generate_on_the_device_matches_the_cpu(tmp_path):
    root = save_tiny_export(tmp_path / "export")
    on_device = load_export(root, DEVICE)
    assert {p.device.type for p in on_device.model.parameters()} == {DEVICE}
    files = generate_from_prompts(on_device, ["a red circle"], tmp_path / "device", seed=3)
    reference = generate_from_prompts(load_export(root, "cpu"), ["a red circle"], tmp_path / "cpu", seed=3)
    a, b = (np.asarray(Image.open(f[1]), np.float32) for f in (files, reference))
    assert a.shape == b.shape == (256, 256, 3)
    # TF32 matmuls and the T5 encoder in bfloat16 on CUDA: close to the CPU's picture, not equal to it
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95, np.abs(a - b).mean()
