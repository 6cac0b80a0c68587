"""The text-encoding stage: embeddings and masks for kept rows only, and no progress bar per model load in a worker."""
from __future__ import annotations

import os

import pytest
from lf_batches import to_batch

from latentforge.datasets.shards import load_npy
from latentforge.pipelines.config import CurationConfig
from latentforge.pipelines.stage import StageChain
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


def test_in_a_ray_worker_models_load_without_progress_bars(text_stage: EncodeText, monkeypatch: pytest.MonkeyPatch,
                                                           capfd: pytest.CaptureFixture) -> None:
    """transformers draws a bar for every model it loads; in each actor Ray forwards it to the driver."""
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    cfg = text_stage.cfg
    chain = type("TextChain", (StageChain,), {"stages": (EncodeText,), "name": "text_chain"})
    capfd.readouterr()
    EncodeText(cfg)
    assert "Loading weights" in capfd.readouterr().err  # outside a worker the bar stays
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what Ray sets in a worker
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    try:
        chain(cfg)
        assert "Loading weights" not in capfd.readouterr().err
    finally:
        os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        hub_utils.enable_progress_bars()
        hf_logging.enable_progress_bar()
