"""Tiny random-weight captioners (BLIP, Florence-2, Qwen2-VL, Whisper) with offline tokenizers, saved as on the hub."""
from __future__ import annotations

import json
from pathlib import Path

# Real words, so a random model's captions are words the cleaning rules can act on.
BLIP_WORDS = ("a the red green blue yellow circle square triangle shape on of in with moving left right up down "
              "top bottom centre background small large bright dark picture image video shows photo").split()
BLIP_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
WHISPER_SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|translate|>",
                    "<|notimestamps|>"]


CPU = {"device": "cpu", "dtype": "float32"}


def captioning_config(captioners: dict, root: Path | str = "corpus", **captioning):
    """A CurationConfig with the tiny BLIP and Whisper (`captioners`: their saved paths) captioning on the CPU;
    `captioning` overrides the settings key by key."""
    from latentforge.pipelines.config import CurationConfig

    base = {"vlm": {"enabled": True, "model": captioners["blip"], "image_size": 32, "frames": 3, "max_new_tokens": 8,
                    "min_new_tokens": 2, "num_beams": 1, **CPU},
            "audio": {"enabled": True, "model": captioners["whisper"], "max_seconds": 2.0, "max_new_tokens": 8,
                      **CPU}}
    for key, value in captioning.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return CurationConfig(input_dir=Path(root), captioning=base)


def save_tiny_blip(root: Path, image_size: int = 32) -> str:
    """BlipForConditionalGeneration + BlipProcessor (BlipImageProcessor + BertTokenizer on a 35-token vocab)."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("\n".join(BLIP_SPECIALS + BLIP_WORDS) + "\n")
    tok = BertTokenizer(str(root / "vocab.txt"), bos_token="[DEC]")
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
                              tokenizer=tok)
    torch.manual_seed(0)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.sep_token_id, sep_token_id=tok.sep_token_id, encoder_hidden_size=32)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=8)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32))
    model.save_pretrained(str(root))
    processor.save_pretrained(str(root))
    return str(root)


def save_tiny_whisper(root: Path, chunk_seconds: int = 2) -> str:
    """WhisperForConditionalGeneration + WhisperProcessor; the tokenizer is byte-level BPE with no merges."""
    import torch
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}))
    (root / "merges.txt").write_text("#version: 0.2\n")
    eot = WHISPER_SPECIALS[0]
    tok = WhisperTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), additional_special_tokens=WHISPER_SPECIALS[1:],
                           eos_token=eot, unk_token=eot, bos_token=eot, pad_token=eot)
    ids = {s: tok.convert_tokens_to_ids(s) for s in WHISPER_SPECIALS}
    features = WhisperFeatureExtractor(feature_size=16, sampling_rate=16000, chunk_length=chunk_seconds)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=len(tok), num_mel_bins=16, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=chunk_seconds * 50, max_target_positions=64, pad_token_id=ids[eot],
        bos_token_id=ids[eot], eos_token_id=ids[eot], decoder_start_token_id=ids["<|startoftranscript|>"]))
    # As in released checkpoints: control tokens are never sampled, and a transcript never starts with its end.
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"], eos_token_id=ids[eot], pad_token_id=ids[eot],
        no_timestamps_token_id=ids["<|notimestamps|>"], is_multilingual=False, max_length=64,
        suppress_tokens=[ids[s] for s in WHISPER_SPECIALS[1:]], begin_suppress_tokens=[ids[eot]])
    model.save_pretrained(str(root))
    WhisperProcessor(feature_extractor=features, tokenizer=tok).save_pretrained(str(root))
    return str(root)


def _byte_level_vocab(root: Path, specials: list[str]) -> tuple[Path, Path, list[int]]:
    """vocab.json/merges.txt for byte-level BPE: specials, the 256 byte symbols, then whole words ("Ġred").

    With no merges the tokenizer encodes prompts byte by byte, but the words decode as words; the byte ids are
    returned so a model's generation config can suppress them and random weights still caption in words.
    """
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    tokens = specials + alphabet + ["Ġ" + w for w in BLIP_WORDS]
    (root / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (root / "merges.txt").write_text("#version: 0.2\n")
    return root / "vocab.json", root / "merges.txt", list(range(len(specials), len(specials) + len(alphabet)))


def save_tiny_florence2(root: Path, image_size: int = 32) -> str:
    """Native Florence2ForConditionalGeneration (DaViT 2 stages + 1-layer BART) + Florence2Processor."""
    import torch
    from transformers import (
        BartTokenizer,
        CLIPImageProcessorPil,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        GenerationConfig,
    )

    root.mkdir(parents=True, exist_ok=True)
    vocab, merges, byte_ids = _byte_level_vocab(root, ["<s>", "<pad>", "</s>", "<unk>"])
    tok = BartTokenizer(str(vocab), str(merges), extra_special_tokens={"image_token": "<image>"})
    grid = image_size // 8  # two DaViT stages, strides 4 and 2
    # Released checkpoints use CLIP's image processor at 768 px; image_seq_length = grid cells + 1 temporal token.
    images = CLIPImageProcessorPil(size={"height": image_size, "width": image_size}, do_center_crop=False,
                                   image_seq_length=grid * grid + 1)
    torch.manual_seed(0)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               decoder_start_token_id=tok.eos_token_id)
    model = Florence2ForConditionalGeneration(Florence2Config(
        vision_config=dict(depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1],
                           patch_prenorm=[False, True], embed_dim=[16, 32], num_heads=[2, 4], num_groups=[2, 4],
                           window_size=4, projection_dim=32, max_position_embeddings=grid, max_temporal_embeddings=4),
        text_config=dict(vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1,
                         encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                         max_position_embeddings=128, **ids),
        image_token_id=tok.image_token_id))
    # The decoder starts with </s> (as released), so captions come back wrapped in special tokens; random weights
    # may pick only words or </s>. (Released checkpoints also force <s> first: a forced token can't be suppressed.)
    never = byte_ids + [tok.bos_token_id, tok.pad_token_id, tok.unk_token_id, tok.image_token_id]
    model.generation_config = GenerationConfig(**ids, suppress_tokens=never)
    model.save_pretrained(str(root))
    Florence2Processor(image_processor=images, tokenizer=tok).save_pretrained(str(root))
    return str(root)


# Qwen2-VL-Instruct's released chat template (system turn, vision placeholders, generation prompt).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QWEN2_VL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                     "<|image_pad|>", "<|video_pad|>"]


def save_tiny_qwen2_vl(root: Path, patch: int = 4) -> str:
    """Native Qwen2VLForConditionalGeneration (1 vision block, 1 decoder layer), Qwen2Tokenizer with the chat
    template, and Qwen2VLImageProcessor; no video processor (Qwen2VLProcessor needs torchvision for it)."""
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2Tokenizer,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    root.mkdir(parents=True, exist_ok=True)
    vocab, merges, byte_ids = _byte_level_vocab(root, QWEN2_VL_SPECIALS)
    tok = Qwen2Tokenizer(str(vocab), str(merges), unk_token=None, bos_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", additional_special_tokens=QWEN2_VL_SPECIALS[1:])
    tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
    ids = {s: tok.convert_tokens_to_ids(s) for s in QWEN2_VL_SPECIALS}
    # factor = patch * merge: a 32 px frame becomes 8x8 patches, merged to 16 image tokens.
    images = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                      min_pixels=(4 * patch) ** 2, max_pixels=(16 * patch) ** 2)
    torch.manual_seed(0)
    special = dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, patch_size=patch, spatial_merge_size=2,
                           temporal_patch_size=2),
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         rope_parameters={"rope_type": "mrope", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                         **special),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"]))
    never = byte_ids + [ids[s] for s in QWEN2_VL_SPECIALS if s != "<|im_end|>"]  # words or the end of the turn
    model.generation_config = GenerationConfig(**special, suppress_tokens=never)
    model.save_pretrained(str(root))
    tok.save_pretrained(str(root))
    images.save_pretrained(str(root))
    return str(root)
