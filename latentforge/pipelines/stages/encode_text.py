"""Caption -> padded token embeddings + mask, stored per row as npy bytes (fp16 embeddings, bool mask)."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np

from latentforge.datasets.encoders.text import TextEncoder, default_text_model
from latentforge.datasets.shards import npy_bytes
from latentforge.pipelines.resources import StageResources
from latentforge.pipelines.stage import Stage

if TYPE_CHECKING:
    from latentforge.pipelines.config import CurationConfig

__all__ = ["EncodeText", "TextEncoder", "default_text_model"]


class EncodeText(Stage):
    name = "encode_text"
    resources = StageResources(num_cpus=1.0, batch_size=32, pool=1)

    def __init__(self, cfg: CurationConfig):
        super().__init__(cfg)
        self.encoder = TextEncoder(cfg.encoders.text)
        self.description = json.dumps(self.encoder.describe(), sort_keys=True)

    def __call__(self, batch):
        n = len(batch["id"])
        emb, mask, desc = (np.empty(n, dtype=object) for _ in range(3))
        emb[:], mask[:], desc[:] = b"", b"", ""
        ok = [i for i in range(n) if batch["status"][i] == "ok"]
        e, m = self.encoder.encode([str(batch["caption"][i]) for i in ok])  # batches of its batch_size
        for j, i in enumerate(ok):
            emb[i], mask[i], desc[i] = npy_bytes(e[j].astype(np.float16)), npy_bytes(m[j]), self.description
        return {**batch, "text_emb": emb, "text_mask": mask, "text_encoder": desc}
