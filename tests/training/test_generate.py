"""`latentforge generate`: a stage export sampled from arbitrary prompts, decoded with its dataset's encoders."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from tiny_export import save_tiny_export

from latentforge.training.config import TrainStageConfig
from latentforge.training.generate import generate_from_prompts, load_export


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return save_tiny_export(tmp_path_factory.mktemp("export"))


def test_images_from_prompts_at_the_dataset_bucket_reproducible_by_seed(export_dir, tmp_path):
    export = load_export(export_dir)
    assert (export.stage.sample_steps, export.stage.cfg_scale, export.stage.sampler) == (3, 1.5, "heun")
    prompts = ["a red circle", "a blue square"]
    files = generate_from_prompts(export, prompts, tmp_path / "a", seed=7)
    assert sorted(f.name for f in files) == ["00_image.png", "00_image.txt", "01_image.png", "01_image.txt",
                                             "grid.png"]
    first = np.asarray(Image.open(tmp_path / "a" / "00_image.png"))
    assert first.shape == (256, 256, 3)  # the most used image bucket, 16 px, shown 16x larger
    assert (tmp_path / "a" / "01_image.txt").read_text() == "a blue square\n"
    again = generate_from_prompts(export, prompts, tmp_path / "b", seed=7)
    assert [f.read_bytes() for f in again] == [f.read_bytes() for f in files]  # same seed: same pictures
    other = generate_from_prompts(export, ["a blue square"], tmp_path / "c", seed=7)  # as prompt 0: seed 7
    assert not np.array_equal(np.asarray(Image.open(other[1])), first)  # the prompt counts
    # unset settings are the stage's (3 heun steps at guidance 1.5), and each of them counts
    stated = generate_from_prompts(export, prompts[:1], tmp_path / "e", seed=7, steps=3, cfg_scale=1.5, sampler="heun")
    assert stated[1].read_bytes() == files[1].read_bytes()
    for change in ({"steps": 4}, {"cfg_scale": 1.0}, {"sampler": "euler"}):
        changed = generate_from_prompts(export, prompts[:1], tmp_path / "f", seed=7, **change)
        assert changed[1].read_bytes() != files[1].read_bytes(), change
    small = generate_from_prompts(export, prompts[:1], tmp_path / "d", bucket="1x8x8", scale=1)
    assert np.asarray(Image.open(small[1])).shape == (8, 8, 3)


def test_video_and_audio_samples_follow_their_buckets(export_dir, tmp_path):
    import soundfile as sf

    export = load_export(export_dir)
    video = generate_from_prompts(export, ["a moving dot"], tmp_path, modality="video", steps=2)
    gif = Image.open(next(f for f in video if f.suffix == ".gif"))
    assert gif.n_frames == 4 and gif.size == (256, 256)  # 4x16x16, the only video bucket
    audio = generate_from_prompts(export, ["a low hum"], tmp_path, modality="audio", steps=2)
    wave, rate = sf.read(next(f for f in audio if f.suffix == ".wav"))
    assert rate == 8000 and len(wave) == 2048 and np.abs(wave).max() <= 1.0


def test_a_wrong_modality_or_bucket_is_refused_with_what_there_is(export_dir, tmp_path):
    export = load_export(export_dir)
    with pytest.raises(ValueError, match="unknown modality 'text'"):
        generate_from_prompts(export, ["x"], tmp_path, modality="text")
    with pytest.raises(ValueError, match="'4x16x16' has 4 frames: not an image bucket"):
        generate_from_prompts(export, ["x"], tmp_path, bucket="4x16x16")
    with pytest.raises(ValueError, match="not an audio bucket"):
        generate_from_prompts(export, ["x"], tmp_path, modality="audio", bucket="1x8x8")
    export.normalizer.stats.pop("audio")
    with pytest.raises(ValueError, match="has no audio latents"):
        generate_from_prompts(export, ["x"], tmp_path, modality="audio", bucket="2048samples@8000Hz")
    export.card = {**export.card, "buckets": {"1x16x16": 5}}
    with pytest.raises(ValueError, match="no video bucket \\(it has 1x16x16\\)"):
        generate_from_prompts(export, ["x"], tmp_path, modality="video")
    with pytest.raises(FileNotFoundError,
                       match="not a stage export: model.safetensors, model_config.json, dataset_card.json missing"):
        load_export(tmp_path)


def test_an_export_without_sampling_settings_uses_the_stage_defaults_and_the_card_statistics(export_dir, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(export_dir, old)
    (old / "sampling.json").unlink()  # exports written before it was recorded
    export = load_export(old)
    assert export.stage.sample_steps == TrainStageConfig.model_fields["sample_steps"].default
    assert generate_from_prompts(export, ["x"], tmp_path / "out", steps=1)


def test_a_training_checkpoint_samples_with_the_dataset_it_trained_on(export_dir, tmp_path):
    """A checkpoint_* directory holds model, EMA, optimiser state and the model config, not the card: given the
    dataset, its EMA weights sample as the export made from them does."""
    import json
    import shutil

    from latentforge.datasets import manifest as mf

    checkpoint, dataset = tmp_path / "checkpoint_000002", tmp_path / "ds"
    checkpoint.mkdir()
    dataset.mkdir()
    shutil.copy(export_dir / "model.safetensors", checkpoint / "ema.safetensors")
    shutil.copy(export_dir / "model_config.json", checkpoint / "model_config.json")
    (dataset / mf.CARD).write_text((export_dir / "dataset_card.json").read_text())
    with pytest.raises(FileNotFoundError, match="not a stage export"):
        load_export(checkpoint)
    with pytest.raises(FileNotFoundError, match="not a training checkpoint: ema.safetensors missing"):
        load_export(export_dir, dataset=dataset)
    settings = json.loads((export_dir / "sampling.json").read_text())["stage"]
    kwargs = {"steps": settings["sample_steps"], "cfg_scale": settings["cfg_scale"], "sampler": settings["sampler"]}
    from_checkpoint = generate_from_prompts(load_export(checkpoint, dataset=dataset), ["a red circle"],
                                            tmp_path / "a", **kwargs)
    from_export = generate_from_prompts(load_export(export_dir), ["a red circle"], tmp_path / "b")
    assert from_checkpoint[1].read_bytes() == from_export[1].read_bytes()


def test_cli_generate(export_dir, tmp_path):
    from typer.testing import CliRunner

    from latentforge.orchestration.cli import app

    result = CliRunner().invoke(app, ["generate", str(export_dir), "-p", "a red circle", "-p", "a tone",
                                      "--out", str(tmp_path / "g"), "--steps", "1"])
    assert result.exit_code == 0, result.output
    assert "wrote 5 files" in result.output and (tmp_path / "g" / "grid.png").is_file()
    bad = CliRunner().invoke(app, ["generate", str(export_dir), "-p", "x", "--bucket", "9x9"])
    assert bad.exit_code == 2 and "not a visual bucket" in bad.output
    (tmp_path / "prompts.txt").write_text("# evaluation prompts\na red circle\n\na blue square\n")
    listed = CliRunner().invoke(app, ["generate", str(export_dir), "--prompts-file", str(tmp_path / "prompts.txt"),
                                      "-p", "a dot", "--out", str(tmp_path / "h"), "--steps", "1"])
    assert listed.exit_code == 0, listed.output
    assert [(tmp_path / "h" / f"0{i}_image.txt").read_text() for i in range(3)] == [
        "a dot\n", "a red circle\n", "a blue square\n"]
    none = CliRunner().invoke(app, ["generate", str(export_dir)])
    assert none.exit_code == 2 and "no prompt" in none.output
