"""Tiny random-weight captioners (BLIP, Whisper) with offline-built tokenizers, saved like hub checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

# Real words, so a random model's captions are words the cleaning rules can act on.
BLIP_WORDS = ("a the red green blue yellow circle square triangle shape on of in with moving left right up down "
              "top bottom centre background small large bright dark picture image video shows photo").split()
BLIP_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
WHISPER_SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|translate|>",
                    "<|notimestamps|>"]


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
