"""Training throughput and MFU of our DiT-XL/2-size model beside facebookresearch/DiT's, in one run.

    git clone https://github.com/facebookresearch/DiT /tmp/DiT && pip install timm   # the reference, separately
    python bench/mfu.py --reference /tmp/DiT/models.py              # one H100: 256 and 1024 tokens, compile off/on
    python bench/mfu.py --tiny --no-reference                       # CPU smoke run (what the test runs)

For each case (256 tokens: 32x32x4 latents = 256 px images through the SD VAE, patch 2; 1024 tokens: 64x64x4)
and each compile setting, both models run the same training step: bf16 autocast forward, MSE loss, backward,
fused AdamW (foreach on CPU). Printed per row: parameters, img/s, achieved TFLOP/s, MFU (achieved / --peak-tflops,
989 = H100 SXM bf16 dense) and ours / reference.

FLOPs are counted analytically with one formula for both models (`train_flops`), not measured:
- every Linear (or patch Conv, which is a Linear on patches) applied to R rows costs 2 * R * in * out;
- attention of N queries over M keys of width d costs 4 * N * M * d (QK^T and AV), per block;
- per-sample work (timestep MLP, adaLN modulation: c -> k * d per block) counts R = 1 row per sample;
- a training step is 3x the forward (backward = 2x forward), the usual convention (Kaplan et al. 2020; PaLM's
  MFU); activation recomputation, norms, softmax and element-wise ops are not counted.
`tests/bench/test_mfu.py` checks the formula against torch's FlopCounterMode on our model.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

H100_BF16_DENSE_TFLOPS = 989.0


@dataclass(frozen=True)
class TransformerSpec:
    """What the FLOP formula needs to know about a DiT-like model (ours or the reference)."""

    width: int  # hidden size d
    depth: int  # blocks
    mlp_ratio: float
    tokens: int  # N image tokens
    in_dim: int  # patch embedding input: C * p * p
    out_dim: int  # final layer output per token
    adaln_chunks: int  # c -> adaln_chunks * d per block (6 in DiT; 9 in ours: + cross-attention)
    ctx_tokens: int = 0  # L text tokens for cross-attention (0: none)
    ctx_dim: int = 0  # text embedding width (projected to d by a 2-layer MLP in ours)
    cond_embed: int = 256  # timestep frequency embedding size (both: 256 -> d -> d)


def linear(rows: float, fan_in: float, fan_out: float) -> float:
    return 2.0 * rows * fan_in * fan_out


def forward_flops(s: TransformerSpec) -> float:
    """Forward FLOPs of one sample (see the module docstring for the rules)."""
    d, n, hidden = s.width, s.tokens, int(s.width * s.mlp_ratio)
    block = linear(n, d, 3 * d) + linear(n, d, d) + 4.0 * n * n * d  # self-attention: q,k,v, proj, scores
    block += linear(n, d, hidden) + linear(n, hidden, d)  # MLP
    block += linear(1, d, s.adaln_chunks * d)  # adaLN modulation
    if s.ctx_tokens:  # cross-attention: q and proj on image tokens, k and v on text tokens
        block += linear(n, d, 2 * d) + linear(s.ctx_tokens, d, 2 * d) + 4.0 * n * s.ctx_tokens * d
    total = s.depth * block
    total += linear(n, s.in_dim, d) + linear(1, d, 2 * d) + linear(n, d, s.out_dim)  # embed, final adaLN, out
    total += linear(1, s.cond_embed, d) + linear(1, d, d)  # timestep MLP
    if s.ctx_tokens:
        total += linear(s.ctx_tokens, s.ctx_dim, d) + linear(s.ctx_tokens, d, d)  # text projection
    return total


def train_flops(s: TransformerSpec, batch: int) -> float:
    return 3.0 * batch * forward_flops(s)


def our_spec(cfg, latent_hw: int) -> TransformerSpec:
    p = cfg.visual_patch
    return TransformerSpec(width=cfg.hidden, depth=cfg.depth + cfg.mixer_depth, mlp_ratio=cfg.mlp_ratio,
                           tokens=(latent_hw // p) ** 2, in_dim=cfg.visual_channels * p * p,
                           out_dim=cfg.visual_channels * p * p, adaln_chunks=9, ctx_tokens=cfg.max_text_len,
                           ctx_dim=cfg.text_dim)


def reference_spec(model, latent_hw: int) -> TransformerSpec:
    """The reference DiT (class-conditional, learn_sigma: twice the channels out), read off the built model."""
    block = model.blocks[0]
    width = model.x_embedder.proj.out_channels
    p = model.patch_size
    return TransformerSpec(width=width, depth=len(model.blocks), mlp_ratio=block.mlp.fc1.out_features / width,
                           tokens=(latent_hw // p) ** 2, in_dim=model.in_channels * p * p,
                           out_dim=model.out_channels * p * p, adaln_chunks=6)


# ---------------------------------------------------------------- models and steps


@dataclass
class Case:
    name: str
    latent_hw: int  # latents are (C, latent_hw, latent_hw)
    batch: int


def load_reference(path: Path):
    """The reference `models.py`, imported from where it was cloned (it needs timm); never copied here."""
    spec = importlib.util.spec_from_file_location("dit_reference_models", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as e:
        sys.exit(f"the reference at {path} needs {e.name}: pip install {e.name}")
    return module


def build_ours(preset: str, channels: int):
    from latentforge.training.dit import build_dit

    return build_dit(preset, visual_channels=channels)


def our_step(model, case: Case, device):
    cfg = model.cfg
    x = torch.randn(case.batch, cfg.visual_channels, 1, case.latent_hw, case.latent_hw, device=device)
    text = torch.randn(case.batch, cfg.max_text_len, cfg.text_dim, device=device)
    mask = torch.ones(case.batch, cfg.max_text_len, dtype=torch.bool, device=device)
    modality = torch.zeros(case.batch, dtype=torch.long, device=device)
    t = torch.rand(case.batch, device=device)
    target = torch.randn_like(x)
    return lambda m: F.mse_loss(m(x, t, text, mask, modality).float(), target)


def reference_step(model, case: Case, device):
    # Its label dropout draws the drop mask on the CPU; off, so no device mix-up (it costs no FLOPs either way).
    model.y_embedder.dropout_prob = 0.0
    x = torch.randn(case.batch, model.in_channels, case.latent_hw, case.latent_hw, device=device)
    t = torch.randint(0, 1000, (case.batch,), device=device)
    y = torch.randint(0, 1000, (case.batch,), device=device)
    target = torch.randn(case.batch, model.out_channels, case.latent_hw, case.latent_hw, device=device)
    return lambda m: F.mse_loss(m(x, t, y).float(), target)


def time_training(model, loss_fn, device, steps: int, warmup: int, compile_model: bool,
                  scope: str = "model") -> float:
    """Seconds per optimiser step (bf16 autocast, fused AdamW on CUDA), after `warmup` steps.

    `scope` "blocks": each block compiled in place (`DiT.compile_blocks`, what training's `compile: true` does);
    "model": the whole model as one graph.
    """
    model = model.to(device).train()
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused, foreach=not fused)
    run = model
    if compile_model and scope == "blocks":
        model.compile_blocks()
    elif compile_model:
        run = torch.compile(model)
    dtype = torch.bfloat16

    def step():
        with torch.autocast(device.type, dtype=dtype):
            loss = loss_fn(run)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t0) / steps


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(name: str, build, step_for, spec_for, case: Case, args, device, compile_model: bool) -> dict:
    torch.manual_seed(0)
    model = build()
    params = sum(p.numel() for p in model.parameters())
    scope = args.compile_scope if name == "ours" else "model"  # the reference has no blocks method: whole model
    t0 = time.perf_counter()
    seconds = time_training(model, step_for(model, case, device), device, args.steps, args.warmup, compile_model,
                            scope)
    wall = time.perf_counter() - t0
    flops = train_flops(spec_for(model, case.latent_hw), case.batch)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    tflops = flops / seconds / 1e12
    return {"model": name, "case": case.name, "compile": compile_model, "params_m": params / 1e6,
            "img_s": case.batch / seconds, "tflops": tflops, "mfu": tflops / args.peak_tflops,
            "gflop_per_img": flops / case.batch / 1e9, "warmup_s": wall - seconds * args.steps,
            "scope": scope if compile_model else "-"}


def print_row(row: dict, baseline: dict | None) -> None:
    ratio = f"{row['img_s'] / baseline['img_s']:.2f}x" if baseline else "-"
    compiled = f"on/{row['scope']}" if row['compile'] else "off"
    print(f"{row['case']:<12} {compiled:<10} {row['model']:<10} {row['params_m']:>8.1f}M "
          f"{row['gflop_per_img']:>9.1f} {row['img_s']:>9.2f} {row['tflops']:>9.2f} {100 * row['mfu']:>7.2f}% "
          f"{ratio:>8} {row['warmup_s']:>9.1f}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ref = ap.add_mutually_exclusive_group(required=True)
    ref.add_argument("--reference", type=Path, help="path to facebookresearch/DiT's models.py (cloned separately)")
    ref.add_argument("--no-reference", action="store_true", help="only our model")
    ap.add_argument("--tiny", action="store_true", help="small preset, small batch, few steps (CPU smoke run)")
    ap.add_argument("--compile", choices=["off", "on", "both"], default="both")
    ap.add_argument("--compile-scope", choices=["blocks", "model"], default="blocks",
                    help="ours compiled block by block (what training does) or as one graph; the reference: one graph")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20; --tiny: 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; --tiny: 1)")
    ap.add_argument("--batch", type=int, default=None, help="images per step (default 64 and 16; --tiny: 2)")
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS, help="device peak for MFU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--case", choices=["256", "1024"], help="only this case (tokens per image); default both")
    ap.add_argument("--ours-first", action="store_true", help="time ours before the reference in each case")
    args = ap.parse_args(argv)
    if not math.isfinite(args.peak_tflops) or args.peak_tflops <= 0:
        ap.error("--peak-tflops must be a positive number")
    args.steps = args.steps or (2 if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    return args


def cases(args) -> list[Case]:
    if args.tiny:
        return [Case("16 tokens", 8, args.batch or 2), Case("64 tokens", 16, args.batch or 2)]
    both = [Case("256 tokens", 32, args.batch or 64), Case("1024 tokens", 64, args.batch or 16)]
    return [c for c in both if args.case is None or c.name.startswith(args.case + " ")]


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    preset, ref_name = ("DiT-T", "DiT-S/2") if args.tiny else ("DiT-XL", "DiT-XL/2")
    reference = None if args.no_reference else load_reference(args.reference)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), torch "
          f"{torch.__version__}, ours {preset}/2 vs reference {ref_name if reference else '-'}, "
          f"peak {args.peak_tflops:g} TFLOP/s")
    print(f"{'case':<12} {'compile':<10} {'model':<10} {'params':>9} {'GFLOP/img':>9} {'img/s':>9} {'TFLOP/s':>9} "
          f"{'MFU':>8} {'vs ref':>8} {'warmup_s':>9}")  # warmup_s: the untimed steps, compilation included
    for case in cases(args):
        for compile_model in {"off": [False], "on": [True], "both": [False, True]}[args.compile]:
            def run_reference(case=case, compile_model=compile_model):
                # input_size is the latent side (the reference's sample.py passes image_size // 8)
                return measure("reference", lambda hw=case.latent_hw: reference.DiT_models[ref_name](input_size=hw),
                               reference_step, reference_spec, case, args, device, compile_model)

            def run_ours(case=case, compile_model=compile_model):
                return measure("ours", lambda: build_ours(preset, 4), our_step, lambda m, hw: our_spec(m.cfg, hw),
                               case, args, device, compile_model)

            if args.ours_first:  # ours printed first, without a ratio; the reference's row carries ref / ours
                ours = run_ours()
                print_row(ours, None)
                if reference is not None:
                    print_row(run_reference(), ours)
                continue
            base = None
            if reference is not None:
                base = run_reference()
                print_row(base, None)
            print_row(run_ours(), base)


if __name__ == "__main__":
    main()
