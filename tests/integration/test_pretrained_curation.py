"""Curation on Ray with each pretrained encoder family (tiny random-weight models loaded by local directory):
the card describes the encoders, `verify` passes and catches damage, and training refuses mixed encoders."""
from __future__ import annotations

import json

import pytest

from latentforge.datasets.compat import IncompatibleDatasets
from latentforge.datasets.demo_corpus import DemoCorpusSpec, generate_demo_corpus
from latentforge.datasets.manifest import Dataset
from latentforge.datasets.verify import verify_dataset
from latentforge.pipelines.config import CurationConfig
from latentforge.pipelines.curate import run_curation

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::FutureWarning")]

CPU = {"device": "cpu", "dtype": "float32"}
# visual kind, audio kind, text kind: together every family is used once
COMBOS = [("autoencoder_kl", "oobleck", "t5"), ("ltx_video", "log_mel", "clip"), ("wan", "dct_frames", "minilm"),
          ("cogvideox", "oobleck", "t5")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    generate_demo_corpus(root, DemoCorpusSpec(num_images=3, num_videos=2, num_audio=2, seed=7, include_broken=False))
    return root


def encoders_config(tmp, visual: str, audio: str, text: str) -> dict:
    from tiny_models import save_text_model, save_vae

    out = {"visual": {"kind": visual, "model": save_vae(visual, tmp / visual), **CPU}}
    if audio == "oobleck":
        out["audio"] = {"kind": "oobleck", "model": save_vae("oobleck", tmp / "oobleck"), **CPU}
    elif audio == "log_mel":
        out["audio"] = {"kind": "log_mel", "n_fft": 256, "hop": 64, "n_mels": 16}
    else:
        out["audio"] = {"kind": "dct_frames", "frame": 32}
    out["text"] = {"kind": text, "max_len": 16}
    if text != "minilm":
        out["text"]["model"] = save_text_model(text, tmp / text)
    return out


@pytest.fixture(scope="module", params=COMBOS, ids=["-".join(c) for c in COMBOS])
def curated(request, corpus, tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("models")
    cfg = CurationConfig.model_validate({
        "name": "tiny", "input_dir": str(corpus), "samples_per_shard": 4, "audio_seconds": 0.25,
        "buckets": [{"height": 16, "width": 16, "frames": 5}, {"height": 16, "width": 32, "frames": 5}],
        "encoders": encoders_config(tmp, *request.param)})
    out = tmp_path_factory.mktemp("dataset")
    result = run_curation(cfg, out)
    return request.param, result, out


def test_every_family_encodes_and_the_card_describes_it(curated):
    (visual, audio, text), result, out = curated
    ds = Dataset(out)
    card = ds.card
    assert (result.kept, result.filtered, result.rejected) == (3 + 2 + 2, 4, 1)  # corpus.json is rejected
    assert card["encoders"]["visual"]["kind"] == visual and card["encoders"]["audio"]["kind"] == audio
    assert card["encoders"]["text"]["kind"] == text
    for family in ("visual", "audio"):
        desc = card["encoders"][family]
        assert desc["config_hash"] and "scale" in desc and "shift" in desc
        assert len(card["latent_stats"][family]["mean"]) == desc["channels"]
    rows = ds.manifest().to_pylist()
    for row in rows:
        if row["modality"] == "video":  # frames fitted to the encoder's rule, one latent per bucket shape
            assert row["bucket"] == "5x16x16" and row["latent_shape"][0] == card["encoders"]["visual"]["channels"]
        if row["modality"] == "image":
            assert row["latent_shape"][1] == 1
    assert len({s["name"] for s in card["shards"]}) >= 3


def test_verify_passes_then_catches_a_corrupted_shard(curated):
    _, _, out = curated
    report = verify_dataset(out)
    assert report.ok, report.problems
    shard = out / "shards" / Dataset(out).card["shards"][0]["name"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x5A
    shard.write_bytes(bytes(data))
    assert not verify_dataset(out).ok


def test_training_refuses_datasets_with_different_encoders(curated, tmp_path):
    from latentforge.training.loader import open_datasets

    (visual, _, _), _, out = curated
    other = tmp_path / "other"
    other.mkdir()
    card = json.loads((out / "card.json").read_text())
    card["encoders"]["visual"]["config_hash"] = "different"
    (other / "card.json").write_text(json.dumps(card))
    with pytest.raises(IncompatibleDatasets, match="visual.config_hash"):
        open_datasets([Dataset(out), Dataset(other)])
