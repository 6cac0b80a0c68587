"""Where our DiT's training step spends its GPU time: variants of the XL/2 model timed in one run, then the
CUDA kernels of the default configuration by total time (torch.profiler).

    python bench/dit_profile.py                    # one GPU; 256 tokens, batch 64, bf16 autocast, compile off

Variants switch off one feature at a time (QK-norm; RoPE -> absolute sin-cos), and `rmsnorm fp32 weight`
restores the QK-norm as it was before attention.QKNorm (torch's RMSNorm given a float32 weight and bf16 input
under autocast, which falls back to unfused kernels), so each row's img/s against the default's is what that
feature costs. Same step as bench/mfu.py (MSE on random latents, fused AdamW).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mfu import Case, our_spec, our_step, time_training, train_flops

from latentforge.training import attention
from latentforge.training.dit import build_dit


def plain_rmsnorm(self, x):  # torch's nn.RMSNorm.forward, as the model used it before QKNorm
    return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="DiT-XL")
    ap.add_argument("--latent-hw", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    case = Case(f"{args.latent_hw ** 2 // 4} tokens", args.latent_hw, args.batch)
    variants = {"default": {}, "rmsnorm fp32 weight": {}, "no qk_norm": {"qk_norm": False},
                "sincos (no rope)": {"pos_embed": "sincos"}, "no qk_norm, sincos": {"qk_norm": False,
                                                                                "pos_embed": "sincos"}}
    base = None
    print(f"{'variant':<22} {'img/s':>8} {'TFLOP/s':>8} {'vs default':>10}")
    for name, overrides in variants.items():
        torch.manual_seed(0)
        model = build_dit(args.preset, visual_channels=4, **overrides)
        saved = attention.QKNorm.forward
        if name == "rmsnorm fp32 weight":
            attention.QKNorm.forward = plain_rmsnorm
        try:
            seconds = time_training(model, our_step(model, case, device), device, args.steps, 3, False)
        finally:
            attention.QKNorm.forward = saved
        flops = train_flops(our_spec(model.cfg, args.latent_hw), args.batch)
        img_s = args.batch / seconds
        base = base or img_s
        print(f"{name:<22} {img_s:>8.1f} {flops / seconds / 1e12:>8.1f} {img_s / base:>9.2f}x", flush=True)
        del model
        torch.cuda.empty_cache() if device.type == "cuda" else None

    model = build_dit(args.preset, visual_channels=4).to(device).train()
    loss_fn = our_step(model, case, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70))


if __name__ == "__main__":
    main()
