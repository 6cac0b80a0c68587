"""The text-encoding stage on rows of mixed status: kept rows get an embedding and a mask, others nothing."""
from __future__ import annotations

import pytest
from lf_batches import to_batch

from latentforge.datasets.shards import load_npy
from latentforge.pipelines.config import CurationConfig
from latentforge.pipelines.stages.encode_text import EncodeText


@pytest.fixture(scope="module")
def text_stage(tmp_path_factory: pytest.TempPathFactory) -> EncodeText:
    """The real packaged MiniLM."""
    return EncodeText(CurationConfig(input_dir=tmp_path_factory.mktemp("unused")))


def test_long_caption_is_truncated_to_max_len(text_stage: EncodeText) -> None:
    caption = " ".join(["word"] * 100)
    batch = to_batch([
        {"id": "s1", "status": "ok", "caption": caption},
        {"id": "s2", "status": "rejected", "caption": ""},
        {"id": "s3", "status": "ok", "caption": "a red circle"},
    ])
    out = text_stage(batch)
    masks = [load_npy(m) if m != b"" else None for m in out["text_mask"]]
    assert masks[0].all() and masks[0].shape == (32,)
    assert masks[1] is None and out["text_emb"][1] == b""
    assert masks[2].sum() == 5  # [CLS] a red circle [SEP]
