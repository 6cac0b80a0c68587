"""bench/mfu.py: its analytic FLOP formula against torch's FlopCounterMode on our model, and a CPU smoke run."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from latentforge.training.dit import DiT, DiTConfig

BENCH = Path(__file__).resolve().parents[2] / "bench" / "mfu.py"


def bench():
    spec = importlib.util.spec_from_file_location("bench_mfu", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("overrides", [{}, {"mixer_depth": 1, "mlp_ratio": 2.0, "visual_patch": 1}])
def test_formula_matches_counted_matmul_and_attention_flops(overrides):
    mfu = bench()
    cfg = DiTConfig(hidden=64, depth=2, heads=4, visual_channels=4, text_dim=16, max_text_len=8, **overrides)
    model, batch, side = DiT(cfg), 3, 8
    # The math backend computes attention with matmuls the counter sees (CPU's fused kernel is not counted).
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(torch.randn(batch, 4, 1, side, side), torch.rand(batch), torch.randn(batch, 8, 16),
              torch.ones(batch, 8, dtype=torch.bool), torch.zeros(batch, dtype=torch.long))
    spec = mfu.our_spec(cfg, side)
    assert spec.tokens == (side // cfg.visual_patch) ** 2
    assert batch * mfu.forward_flops(spec) == counter.get_total_flops()
    assert mfu.train_flops(spec, batch) == 3 * counter.get_total_flops()


def test_hand_count_of_one_block():
    mfu = bench()
    # d=2, N=3, MLP 2x: qkv 2*3*2*6=72, proj 24, scores 4*9*2=72, MLP 2*3*2*4*2=96, adaLN 2*2*12=48 -> 312
    spec = mfu.TransformerSpec(width=2, depth=1, mlp_ratio=2.0, tokens=3, in_dim=1, out_dim=1, adaln_chunks=6,
                               cond_embed=1)
    embed_and_out = 2 * 3 * 1 * 2 + 2 * 2 * 4 + 2 * 3 * 2 * 1 + 2 * 1 * 2 + 2 * 2 * 2
    assert mfu.forward_flops(spec) == 312 + embed_and_out


def test_tiny_run_prints_throughput_and_mfu():
    out = subprocess.run([sys.executable, str(BENCH), "--tiny", "--no-reference", "--compile", "off", "--steps", "1",
                          "--warmup", "0"], capture_output=True, text=True, timeout=600, check=True).stdout
    rows = [line.split() for line in out.splitlines() if re.match(r"^\d+ tokens\s+off\s+ours", line)]
    assert len(rows) == 2, out
    for row in rows:
        img_s, tflops, mfu = float(row[6]), float(row[7]), float(row[8].rstrip("%"))
        assert img_s > 0 and tflops >= 0 and 0 <= mfu <= 100
