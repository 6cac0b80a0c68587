"""Latent encoders with a device option on CUDA (datasets/encoders/, REPA features): tiny VAEs, text encoders and
DINOv2 built from configs, their latents on the device against the CPU's. See test_cuda.py for LF_GPU_TESTS_DEVICE."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from lf_gpu import DEVICE, GPU_MARKS, assert_params, auto_dtype, device_option, rel_err
from tiny_dinov2 import save_tiny_dinov2

pytestmark = GPU_MARKS


VAE_TOLERANCE = 0.05  # relative L2 error of bf16 latents against float32 ones (tiny VAEs: ~0.5-1% seen on CPU)


@pytest.fixture(scope="module")
def vae_dirs(tmp_path_factory) -> dict[str, str]:
    pytest.importorskip("diffusers")
    from tiny_models import save_vae

    root = tmp_path_factory.mktemp("vaes")
    return {kind: save_vae(kind, root / kind, subfolder="vae")
            for kind in ("autoencoder_kl", "ltx_video", "wan", "cogvideox", "oobleck")}


VISUAL = {"autoencoder_kl": (2, 2, 16, 16), "ltx_video": (1, 9, 16, 16), "wan": (1, 5, 16, 16),
          "cogvideox": (1, 5, 16, 16)}  # (B, T, H, W) each family accepts


@pytest.mark.parametrize("kind", list(VISUAL))
def test_visual_vae_encodes_on_device_like_cpu(vae_dirs, kind) -> None:
    from latentforge.datasets.encoders import build_visual_encoder
    from latentforge.datasets.encoders.config import AutoencoderKLConfig, VideoVAEConfig

    config = AutoencoderKLConfig if kind == "autoencoder_kl" else VideoVAEConfig
    ref = {"kind": kind, "model": vae_dirs[kind], "subfolder": "vae"}
    on_device = build_visual_encoder(config(**ref, device=device_option("auto"), dtype="auto"))
    on_cpu = build_visual_encoder(config(**ref, device="cpu", dtype="float32"))
    expected = auto_dtype(torch.bfloat16)
    assert (on_device.vae.device.type, on_device.vae.dtype) == (DEVICE, expected)
    assert_params(on_device.vae.model, expected)
    assert on_device.describe()["dtype"] == str(expected).removeprefix("torch.")
    b, t, h, w = VISUAL[kind]
    frames = np.random.default_rng(0).integers(0, 256, (b, t, h, w, 3), dtype=np.uint8)
    z, z_cpu = on_device.encode(frames), on_cpu.encode(frames)
    assert z.dtype == np.float32 and z.shape == z_cpu.shape and np.isfinite(z).all()
    assert rel_err(z, z_cpu) < VAE_TOLERANCE, rel_err(z, z_cpu)
    decoded = on_device.decode(z)
    assert decoded.dtype == np.uint8 and decoded.shape == frames.shape


def test_oobleck_encodes_on_device_like_cpu(vae_dirs) -> None:
    from latentforge.datasets.encoders import build_audio_encoder
    from latentforge.datasets.encoders.config import OobleckConfig

    ref = {"kind": "oobleck", "model": vae_dirs["oobleck"], "subfolder": "vae"}
    on_device = build_audio_encoder(OobleckConfig(**ref, device=device_option("cuda"), dtype="auto"), 16000)
    on_cpu = build_audio_encoder(OobleckConfig(**ref, device="cpu", dtype="float32"), 16000)
    expected = auto_dtype(torch.bfloat16)
    assert (on_device.vae.device.type, on_device.vae.dtype) == (DEVICE, expected)
    assert_params(on_device.vae.model, expected)
    t = np.arange(on_device.hop * 40) / 16000
    waves = np.stack([0.5 * np.sin(2 * np.pi * f * t) for f in (220, 330, 550)]).astype(np.float32)
    z, z_cpu = on_device.encode(waves), on_cpu.encode(waves)
    assert z.shape == z_cpu.shape and np.isfinite(z).all()
    assert rel_err(z, z_cpu) < VAE_TOLERANCE, rel_err(z, z_cpu)
    assert on_device.decode(z).shape[0] == len(waves)


@pytest.mark.parametrize("kind", ["t5", "clip"])
def test_text_encoder_on_device_like_cpu(tmp_path, kind) -> None:
    """T5 / CLIP run in bf16 on CUDA (BF16_ON_CUDA); T5 may keep its `wo` projections in float32
    (`_keep_in_fp32_modules`; transformers 5.24 applies it to float16 only)."""
    from tiny_captioners import BLIP_SPECIALS, BLIP_WORDS
    from tiny_models import tiny_clip, tiny_t5
    from transformers import BertTokenizer

    from latentforge.datasets.encoders.config import TextEncoderConfig
    from latentforge.datasets.encoders.text import TextEncoder

    (tmp_path / "vocab.txt").write_text("\n".join(BLIP_SPECIALS + BLIP_WORDS) + "\n")
    tokenizer = BertTokenizer(str(tmp_path / "vocab.txt"))  # a local word vocabulary: no MiniLM package needed
    torch.manual_seed(0)
    model = tiny_t5(tokenizer) if kind == "t5" else tiny_clip(tokenizer)
    model.save_pretrained(str(tmp_path / "enc"))
    tokenizer.save_pretrained(str(tmp_path / "enc"))
    cfg = {"kind": kind, "model": str(tmp_path / "enc"), "max_len": 12}
    on_device = TextEncoder(TextEncoderConfig(**cfg, device=device_option("auto")))
    on_cpu = TextEncoder(TextEncoderConfig(**cfg, device="cpu"))
    expected = auto_dtype(torch.bfloat16)
    assert on_device.dtype == expected
    assert_params(on_device.model, expected, keep_fp32=("wo",) if kind == "t5" else ())
    captions = ["a red circle on the left", "blue square", "", "a small bright triangle moving up"]
    (emb, mask), (emb_cpu, mask_cpu) = on_device.encode(captions), on_cpu.encode(captions)
    assert emb.dtype == np.float32 and emb.shape == emb_cpu.shape and np.array_equal(mask, mask_cpu)
    assert np.isfinite(emb).all() and rel_err(emb[mask], emb_cpu[mask]) < VAE_TOLERANCE


def test_repa_features_on_device_like_cpu(tmp_path) -> None:
    from latentforge.datasets.encoders.config import RepaEncoderConfig
    from latentforge.pipelines.stages.encode_repa import RepaFeatures

    torch.manual_seed(0)
    model = save_tiny_dinov2(tmp_path / "dino", registers=2)
    on_device = RepaFeatures(RepaEncoderConfig(model=model, patch=2, device=device_option("auto"), dtype="auto"))
    on_cpu = RepaFeatures(RepaEncoderConfig(model=model, patch=2, device="cpu", dtype="float32"))
    expected = auto_dtype(torch.bfloat16)
    assert (on_device.device.type, on_device.dtype) == (DEVICE, expected)
    assert_params(on_device.model, expected)
    frames = np.random.default_rng(0).integers(0, 255, (3, 12, 20, 3), dtype=np.uint8)
    out, out_cpu = on_device(frames, (3, 5)), on_cpu(frames, (3, 5))
    assert out.shape == out_cpu.shape == (45, on_cpu.dim) and out.dtype == np.float16 and np.isfinite(out).all()
    assert rel_err(out, out_cpu) < VAE_TOLERANCE, rel_err(out, out_cpu)
