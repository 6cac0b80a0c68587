"""CUDA paths on tiny random-weight models: captioners and the DiT under bf16 autocast (the latent encoders are in
test_cuda_encoders.py, `generate` in test_generate_cuda.py; the device and marks they share in lf_gpu.py).

Every test is marked `gpu` and skips where torch sees no CUDA device, so CI (CPU only) collects and skips them.
`scripts/device_check.sh` runs them on a GPU machine: `python3 -m pytest -m gpu tests/gpu -rs`.

`LF_GPU_TESTS_DEVICE=cpu` runs the same bodies on the CPU instead of CUDA (device options "auto"/"cuda" become
"cpu", and "auto" dtypes are then expected to resolve to float32, as the code documents for CPU), so the tests'
own logic is checked without a GPU:

    LF_GPU_TESTS_DEVICE=cpu .venv/bin/pytest -q -m gpu tests/gpu

Nothing downloads weights: the models are built from configs (tests/tiny_*.py) and saved to a tmp dir, then
loaded back by the real `from_pretrained` code.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lf_gpu import DEVICE, GPU_MARKS, ON_CUDA, assert_params, auto_dtype, device_option, rel_err
from tiny_captioners import save_tiny_blip, save_tiny_florence2, save_tiny_qwen2_vl, save_tiny_whisper

pytestmark = GPU_MARKS


# ---- captioners (pipelines/stages/caption_vlm.py, caption_audio.py) ----------------------------------------

@pytest.fixture(scope="module")
def captioners(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("captioners")
    return {"blip": save_tiny_blip(root / "blip"), "florence2": save_tiny_florence2(root / "florence2"),
            "qwen2_vl": save_tiny_qwen2_vl(root / "qwen2_vl"), "whisper": save_tiny_whisper(root / "whisper")}


def curation_config(tmp_path: Path, vlm: dict | None = None, audio: dict | None = None):
    from latentforge.pipelines.config import CurationConfig

    captioning: dict = {"clean": {"enabled": False}}  # raw model text: what generate returned, nothing dropped
    if vlm is not None:
        captioning["vlm"] = {"enabled": True, "image_size": 32, "frames": 3, "max_new_tokens": 6,
                             "min_new_tokens": 2, "num_beams": 1, **vlm}
    if audio is not None:
        captioning["audio"] = {"enabled": True, "max_seconds": 2.0, "max_new_tokens": 6, **audio}
    return CurationConfig(input_dir=tmp_path, captioning=captioning)


def frame_rows(counts: list[int]) -> tuple[dict, list[np.ndarray]]:
    """A stage batch of rows holding `counts[i]` random 32 px frames each, and all frames in order."""
    from lf_batches import to_batch

    from latentforge.datasets.shards import npy_bytes
    from latentforge.pipelines.stages.caption_vlm import FRAMES_COLUMN

    rng = np.random.default_rng(0)
    stacks = [rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in counts]
    rows = [{"id": f"r{i}", "status": "ok", "caption_error": "", FRAMES_COLUMN: npy_bytes(s)}
            for i, s in enumerate(stacks)]
    return to_batch(rows), [f for s in stacks for f in s]


def assert_no_failed_batch(errors, prefix: str) -> None:
    """A failed generate call is recorded as '<prefix>: <Exception>: ...'; only empty-text notes may appear."""
    for e in errors:
        assert e == "" or e.endswith("after cleaning"), e
        assert not e.startswith(f"{prefix}: ") or "empty" in e, e


VLM_CASES = [  # family, device option, dtype option, expected dtype
    ("blip", "auto", "auto", auto_dtype(torch.float16)),
    ("florence2", "cuda", "auto", auto_dtype(torch.float16)),
    ("qwen2_vl", "auto", "auto", auto_dtype(torch.bfloat16)),
    ("blip", "cuda", "bfloat16", torch.bfloat16),
    ("qwen2_vl", "cuda", "float32", torch.float32),
]


@pytest.mark.parametrize("family,device,dtype,expected", VLM_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in VLM_CASES])
def test_vlm_captioner_on_device(captioners, tmp_path, family, device, dtype, expected) -> None:
    from latentforge.pipelines.stages.caption_vlm import CaptionVLM

    vlm = {"family": family, "model": captioners[family], "device": device_option(device), "dtype": dtype}
    stage = CaptionVLM(curation_config(tmp_path, vlm=vlm))
    captioner = stage.captioner
    assert (captioner.device.type, captioner.dtype) == (DEVICE, expected)
    assert_params(captioner.model, expected)
    batch, frames = frame_rows([1, 1, 3])  # two images and a 3-frame clip: 5 frames in one generate call
    texts = captioner.caption(frames)
    assert len(texts) == len(frames) and all(isinstance(t, str) for t in texts), texts
    assert all(t.strip() for t in texts), texts  # min_new_tokens=2 and words-only vocabularies: never empty
    out = stage(batch)
    assert_no_failed_batch(out["caption_error"], "vlm")
    assert all(isinstance(c, str) and c for c in out["caption_generated"]), list(out["caption_generated"])


@pytest.mark.parametrize("device,dtype,expected", [("cuda", "auto", auto_dtype(torch.float16)),
                                                   ("auto", "float32", torch.float32)])
def test_whisper_captioner_on_device(captioners, tmp_path, device, dtype, expected) -> None:
    from lf_batches import to_batch

    from latentforge.datasets.shards import npy_bytes
    from latentforge.pipelines.stages.caption_audio import AUDIO_COLUMN, CaptionAudio

    audio = {"model": captioners["whisper"], "device": device_option(device), "dtype": dtype}
    stage = CaptionAudio(curation_config(tmp_path, audio=audio))
    assert (stage.captioner.device.type, stage.captioner.dtype) == (DEVICE, expected)
    assert_params(stage.captioner.model, expected)
    t = np.arange(16000 * 2) / 16000
    rng = np.random.default_rng(1)
    waves = [(0.3 * np.sin(2 * np.pi * f * t[:n]) + 0.02 * rng.standard_normal(n)).astype(np.float32)
             for f, n in ((220, 16000), (440, 24000), (880, 32000))]
    texts = stage.captioner.transcribe(waves)
    assert len(texts) == len(waves) and all(isinstance(x, str) for x in texts), texts
    batch = to_batch([{"id": f"a{i}", "status": "ok", "caption_error": "", AUDIO_COLUMN: npy_bytes(w)}
                      for i, w in enumerate(waves)])
    out = stage(batch)
    assert_no_failed_batch(out["caption_error"], "audio")
    assert len(out["caption_audio"]) == len(waves)


# ---- DiT training under bf16 autocast (training/dit.py, flow.py, attention.py, loop.py) ---------------------

def tiny_dit():
    from latentforge.training.dit import DiT, DiTConfig

    torch.manual_seed(0)
    return DiT(DiTConfig(hidden=64, depth=2, heads=4, visual_channels=4, audio_channels=8, text_dim=32,
                         max_text_len=8, pos_embed="rope", qk_norm=True))


def fixed_batch(device: str):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 4, 2, 8, 8, generator=g)  # a 2-frame video latent: 3D RoPE over (T, H, W)
    text = torch.randn(4, 6, 32, generator=g)
    mask = torch.arange(6)[None] < torch.tensor([[6], [3], [1], [4]])
    modality = torch.ones(4, dtype=torch.long)
    return tuple(v.to(device) for v in (x0, text, mask, modality))


def test_dit_trains_under_bf16_autocast() -> None:
    """As loop.build_accelerator / train_step do: Accelerator(mixed_precision="bf16"), acc.autocast()."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from latentforge.training.flow import flow_loss

    # Accelerate keeps one state per process and refuses another precision: a training test run earlier in this
    # process (LF_GPU_TESTS_DEVICE=cpu after tests/training) made it "no". A Ray Train worker builds one.
    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(cpu=not ON_CUDA, mixed_precision="bf16")
    assert acc.device.type == DEVICE
    model = tiny_dit()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, opt = acc.prepare(model, opt)
    assert next(model.parameters()).device.type == DEVICE
    x0, text, mask, modality = fixed_batch(DEVICE)

    def loss_at(seed: int, grad: bool) -> torch.Tensor:  # 4 fixed (t, noise) draws: a fixed target to fit
        with torch.set_grad_enabled(grad), acc.autocast():
            return flow_loss(model, x0, text, mask, modality, generator=torch.Generator().manual_seed(seed))

    with acc.autocast():  # the autocast really computes in bf16 (params stay float32 for the optimiser)
        out = model(x0, torch.rand(4, device=DEVICE), text, mask, modality)
    assert out.shape == x0.shape and next(model.parameters()).dtype == torch.float32
    initial = sum(loss_at(i, False).item() for i in range(4))
    losses = []
    for step in range(24):
        loss = loss_at(step % 4, True)
        opt.zero_grad()
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)), losses
    final = sum(loss_at(i, False).item() for i in range(4))
    assert np.isfinite(final) and final < 0.9 * initial, (initial, final, losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses


def test_attention_runs_on_the_kernels_the_code_aims_at() -> None:
    """Self-attention passes no mask (so SDPA may take the flash kernel), cross-attention a key mask (the
    memory-efficient kernel takes it); each forced alone must run and match the math kernel. On the CPU the
    fused kernel is the CPU flash one for both."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from latentforge.training.attention import Attention, rope_tables

    torch.manual_seed(0)
    attn = Attention(64, 4, qk_norm=True).to(DEVICE)
    x, ctx = torch.randn(2, 16, 64, device=DEVICE), torch.randn(2, 6, 64, device=DEVICE)
    ctx_mask = torch.arange(6, device=DEVICE)[None] < torch.tensor([[6], [2]], device=DEVICE)
    rope = rope_tables(16, (1, 4, 4), torch.device(DEVICE))
    fused = {"self": SDPBackend.FLASH_ATTENTION,
             "cross": SDPBackend.EFFICIENT_ATTENTION if ON_CUDA else SDPBackend.FLASH_ATTENTION}
    calls = {"self": lambda: attn(x, rope=rope), "cross": lambda: attn(x, ctx, ctx_mask)}
    for kind, call in calls.items():
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            with sdpa_kernel([fused[kind]]):
                out = call()
                out.float().square().mean().backward()  # the fused kernel's backward too
            with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
                ref = call()
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2, msg=f"{kind}-attention")
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in attn.parameters()
                   if p.requires_grad and (kind == "self" or p is not attn.q_norm.weight))
        attn.zero_grad()


def test_dit_forward_and_backward_without_the_math_kernel() -> None:
    """The whole DiT (rope self-attention, masked cross-attention) under autocast with only fused kernels."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = tiny_dit().to(DEVICE)
    with torch.no_grad():  # zero-initialised gates would hide the attention from the output
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x0, text, mask, modality = fixed_batch(DEVICE)
    t = torch.full((4,), 0.5, device=DEVICE)
    kernels = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION] if ON_CUDA else [
        SDPBackend.FLASH_ATTENTION]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        with sdpa_kernel(kernels):
            out = model(x0, t, text, mask, modality)
            out.float().square().mean().backward()
        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
            ref = model(x0, t, text, mask, modality)
    assert torch.isfinite(out).all() and out.abs().sum() > 0
    assert rel_err(out.float().detach().cpu().numpy(), ref.float().cpu().numpy()) < 0.05
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_a_training_step_ema_update_and_sample_run_on_the_device() -> None:
    """The loop's own pieces on DEVICE, as a stage runs them after `prepare` (whose restore needs Ray Train):
    `place` puts model and EMA on the accelerator's device, a bf16 `train_step` over two micro-batches, the EMA
    update, then a sample from CPU-side prompts. (The EMA once stayed on the CPU: the first update failed.)"""
    import copy

    from accelerate.state import AcceleratorState

    from latentforge.training.config import TrainStageConfig
    from latentforge.training.loader import Batch
    from latentforge.training.loop import (
        build_accelerator,
        build_optimizer,
        place,
        step_generator,
        train_step,
        update_ema,
    )
    from latentforge.training.sampling import generate

    AcceleratorState._reset_state(reset_partial_state=True)  # see test_dit_trains_under_bf16_autocast
    stage = TrainStageConfig(name="s", modalities=["video"], precision="bf16", grad_accum=2, timestep_shift=2.0)
    acc = build_accelerator(stage)
    raw = tiny_dit()
    ema = copy.deepcopy(raw).requires_grad_(False)
    optimizer, scheduler = build_optimizer(raw, stage)
    model, optimizer, ema = place(acc, raw, ema, optimizer)
    assert {p.device.type for p in [*model.parameters(), *ema.parameters()]} == {DEVICE}
    x0, text, mask, modality = fixed_batch("cpu")  # the loader's batches arrive on the CPU
    stream = iter([Batch(x0, text, mask, modality, ["a caption"] * 4)] * 2)
    loss, seen, _ = train_step(acc, model, stream, stage, step_generator(0, 0, 0), patch=2)
    optimizer.step()
    scheduler.step()
    before = [e.clone() for e in ema.parameters()]
    update_ema(ema, raw, stage.ema_decay, 0)
    assert np.isfinite(loss) and seen == 8
    assert any(not torch.equal(e, b) for e, b in zip(ema.parameters(), before))  # the EMA followed the step
    prompt = Batch(x0[:1], text[:1], mask[:1], modality[:1], ["a caption"])
    out = generate(ema.eval(), prompt, steps=2, cfg_scale=2.0, seed=0, timestep_shift=2.0)
    assert out.device.type == DEVICE and out.shape == x0[:1].shape and torch.isfinite(out).all()


@pytest.mark.skipif(not ON_CUDA, reason="pinned memory needs CUDA")
def test_the_loader_hands_pinned_batches_to_the_device() -> None:
    """DataLoader(pin_memory=True) pins a custom type only through its own pin_memory(): Batch came back unpinned."""
    from latentforge.training.loader import Batch

    x0, text, mask, modality = fixed_batch("cpu")
    loader = torch.utils.data.DataLoader([Batch(x0, text, mask, modality, ["a caption"] * 4)], batch_size=None,
                                         pin_memory=True)
    batch = next(iter(loader))
    assert all(t.is_pinned() for t in (batch.latent, batch.text, batch.text_mask, batch.modality))
    moved = batch.to("cuda")
    torch.cuda.synchronize()
    assert torch.equal(moved.latent.cpu(), x0) and moved.text_mask.device.type == "cuda"
