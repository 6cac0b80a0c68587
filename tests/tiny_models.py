"""Tiny random-weight models saved like hub checkpoints, for tests that must load real code paths offline."""
from __future__ import annotations

from pathlib import Path


def _save(model, root: Path, subfolder: str | None = None) -> str:
    model.save_pretrained(str(root / subfolder) if subfolder else str(root))
    return str(root)


def tiny_kl():
    import diffusers

    return diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                                   norm_num_groups=4, sample_size=16, scaling_factor=0.5, shift_factor=0.1)


def tiny_ltx(timestep_conditioning: bool = False):
    import diffusers
    import torch

    vae = diffusers.AutoencoderKLLTXVideo(
        latent_channels=4, block_out_channels=(8, 16), down_block_types=("LTXVideoDownBlock3D",) * 2,
        decoder_block_out_channels=(8, 8), layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
        spatio_temporal_scaling=(True, False), decoder_spatio_temporal_scaling=(True, False),
        decoder_inject_noise=(False,) * 3, downsample_type=("conv", "conv"), upsample_residual=(False, False),
        upsample_factor=(1, 1), patch_size=2, scaling_factor=0.8, timestep_conditioning=timestep_conditioning)
    vae.latents_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    vae.latents_std.copy_(torch.tensor([1.5, 0.5, 2.0, 1.0]))
    return vae


def tiny_wan():
    import diffusers

    return diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1,
                                      temperal_downsample=[True, True], latents_mean=[0.2, -0.1, 0.0, 0.4],
                                      latents_std=[2.0, 0.5, 1.0, 1.5])


def tiny_cogvideox():
    import diffusers

    return diffusers.AutoencoderKLCogVideoX(
        block_out_channels=(8, 16), down_block_types=("CogVideoXDownBlock3D",) * 2,
        up_block_types=("CogVideoXUpBlock3D",) * 2, latent_channels=4, layers_per_block=1, norm_num_groups=4,
        temporal_compression_ratio=2, scaling_factor=0.7, shift_factor=0.2)


def tiny_oobleck():
    import diffusers

    return diffusers.AutoencoderOobleck(encoder_hidden_size=8, downsampling_ratios=[2, 4], channel_multiples=[1, 2],
                                        decoder_channels=8, decoder_input_channels=4, audio_channels=2,
                                        sampling_rate=16000)


def minilm_tokenizer():
    from transformers import AutoTokenizer

    from latentforge.datasets.encoders.text import default_text_model

    return AutoTokenizer.from_pretrained(default_text_model())


def tiny_t5(tokenizer, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=64, num_layers=2,
                                   num_heads=4))


def tiny_clip(tokenizer, hidden: int = 32, positions: int = 16):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=positions, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id))


VAE_BUILDERS = {"autoencoder_kl": tiny_kl, "ltx_video": tiny_ltx, "wan": tiny_wan, "cogvideox": tiny_cogvideox,
                "oobleck": tiny_oobleck}


def save_vae(kind: str, root: Path, subfolder: str | None = None) -> str:
    """A tiny VAE of `kind` saved under root (weights seeded, so every call gives the same model)."""
    import torch

    torch.manual_seed(0)
    return _save(VAE_BUILDERS[kind](), root, subfolder)


def save_text_model(kind: str, root: Path) -> str:
    import torch

    torch.manual_seed(0)
    tokenizer = minilm_tokenizer()
    model = tiny_t5(tokenizer) if kind == "t5" else tiny_clip(tokenizer)
    model.save_pretrained(str(root))
    tokenizer.save_pretrained(str(root))
    return str(root)


def save_clip_vision(root: Path, projection_dim: int = 16, image_size: int = 32) -> str:
    """A tiny random CLIP vision tower with projection, and its image processor, saved like a hub checkpoint."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image_size, patch_size=8, projection_dim=projection_dim)
    CLIPVisionModelWithProjection(config).save_pretrained(str(root))
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(str(root))
    return str(root)
