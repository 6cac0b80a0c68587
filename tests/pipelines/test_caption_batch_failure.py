"""A row that breaks its captioner's batched `generate` costs only its own caption, not the whole batch's.

Real files, decoded by CaptionPrep, through the tiny random-weight BLIP and Whisper (tests/tiny_captioners.py).
The failing row is real input the real processor refuses: a frame stack that is not an image (VLM), a waveform
left in two channels (Whisper).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from lf_batches import by_relpath, to_batch
from PIL import Image
from tiny_captioners import captioning_config

from latentforge.datasets.demo_corpus import encode_video
from latentforge.datasets.shards import load_npy, npy_bytes
from latentforge.pipelines.discover import discover
from latentforge.pipelines.stages.caption_audio import AUDIO_COLUMN, CaptionAudio
from latentforge.pipelines.stages.caption_prep import CaptionPrep
from latentforge.pipelines.stages.caption_vlm import FRAMES_COLUMN, CaptionVLM
from latentforge.pipelines.stages.probe_media import ProbeMedia


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for k in range(3):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((64, 48), Image.Resampling.BICUBIC).save(root / f"img_{k}.png")
    encode_video(root / "clip.mp4", rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), 8)
    t = np.arange(16000) / 16000
    for k, hz in enumerate((220, 440, 880)):
        sf.write(str(root / f"tone_{k}.wav"), (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), 16000)
    return root


@pytest.fixture(scope="module")
def prepared(corpus: Path, captioners: dict) -> dict[str, np.ndarray]:
    cfg = captioning_config(captioners, corpus)
    batch = ProbeMedia(cfg)(to_batch(discover(corpus, samples_per_shard=64)))
    n = len(batch["id"])
    batch["caption_error"] = np.array([""] * n, dtype=object)  # CaptionSidecar's column, empty: no sidecars
    batch["clip_start_s"], batch["clip_index"] = np.zeros(n), np.full(n, -1)
    batch["clip_end_s"] = np.array([float(d) for d in batch["duration_s"]])
    out = CaptionPrep(cfg)(batch)
    assert list(out["status"]) == ["ok"] * n, list(out["message"])
    return out


def damaged(prepared: dict, column: str, relpath: str, value: np.ndarray) -> dict[str, np.ndarray]:
    batch = {k: v.copy() for k, v in prepared.items()}
    batch[column][list(batch["relpath"]).index(relpath)] = npy_bytes(value)
    return batch


def test_a_frame_stack_the_vlm_refuses_costs_only_its_row(prepared: dict, captioners: dict, corpus: Path) -> None:
    stage = CaptionVLM(captioning_config(captioners, corpus))
    clean = by_relpath(stage(dict(prepared)))
    out = by_relpath(stage(damaged(prepared, FRAMES_COLUMN, "img_1.png", np.zeros((1, 4), np.uint8))))
    bad = out["img_1.png"]
    assert (bad["status"], bad["caption_generated"]) == ("ok", "")
    assert bad["caption_error"].startswith("vlm: ") and "empty caption" not in bad["caption_error"]
    for relpath in ("img_0.png", "img_2.png", "clip.mp4"):  # captioned alone, as they were in the batch
        assert out[relpath]["caption_generated"] == clean[relpath]["caption_generated"] != "", relpath
        assert out[relpath]["caption_error"] == clean[relpath]["caption_error"], relpath
    assert all(out[f"tone_{k}.wav"]["caption_error"] == "" for k in range(3))


def test_a_waveform_whisper_refuses_costs_only_its_row(prepared: dict, captioners: dict, corpus: Path) -> None:
    stage = CaptionAudio(captioning_config(captioners, corpus))
    clean = by_relpath(stage(dict(prepared)))
    mono = load_npy(prepared[AUDIO_COLUMN][list(prepared["relpath"]).index("tone_1.wav")])
    out = by_relpath(stage(damaged(prepared, AUDIO_COLUMN, "tone_1.wav", np.stack([mono, mono]))))  # two channels
    bad = out["tone_1.wav"]
    assert (bad["status"], bad["caption_audio"]) == ("ok", "")
    assert bad["caption_error"].startswith("audio: ") and "empty transcript" not in bad["caption_error"]
    for relpath in ("tone_0.wav", "tone_2.wav"):
        assert out[relpath]["caption_audio"] == clean[relpath]["caption_audio"] != "", relpath
        assert out[relpath]["caption_error"] == clean[relpath]["caption_error"] == "", relpath


def test_a_batch_that_succeeds_is_one_generate_call(prepared: dict, captioners: dict, corpus: Path) -> None:
    """The retry is only for a failed batch: a good batch still goes to the model at once."""
    stages = CaptionVLM(captioning_config(captioners, corpus)), CaptionAudio(captioning_config(captioners, corpus))
    calls: list[int] = []
    for stage, method in zip(stages, ("caption", "transcribe")):
        real = getattr(stage.captioner, method)
        setattr(stage.captioner, method, lambda items, real=real: calls.append(len(items)) or real(items))
        stage(dict(prepared))
    assert calls == [3 + 3, 3]  # three images and a clip's three frames; three waveforms
