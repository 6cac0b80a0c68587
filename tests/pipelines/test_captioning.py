"""Captioning stages as plain callables on real decoded media, with tiny BLIP / Whisper loaded by from_pretrained."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from lf_batches import by_relpath, to_batch
from pydantic import ValidationError
from tiny_captioners import captioning_config

from latentforge.datasets.demo_corpus import DemoCorpusSpec, encode_video, generate_demo_corpus
from latentforge.datasets.shards import load_npy
from latentforge.pipelines.config import CurationConfig
from latentforge.pipelines.curate import STAGES, active_stages, stage_graph
from latentforge.pipelines.discover import discover
from latentforge.pipelines.stages.caption_audio import AUDIO_COLUMN, CaptionAudio
from latentforge.pipelines.stages.caption_prep import CaptionPrep, frame_times
from latentforge.pipelines.stages.caption_select import CaptionSelect
from latentforge.pipelines.stages.caption_sidecar import CaptionSidecar
from latentforge.pipelines.stages.caption_vlm import FRAMES_COLUMN, CaptionVLM
from latentforge.pipelines.stages.probe_media import ProbeMedia

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    generate_demo_corpus(root, DemoCorpusSpec(num_images=2, num_videos=1, num_audio=2, include_broken=False, seed=3))
    # half red, half blue: tells whether a clip's own span was decoded
    frames = np.zeros((16, 64, 64, 3), np.uint8)
    frames[:8, ..., 0], frames[8:, ..., 2] = 220, 220
    encode_video(root / "videos" / "halves.mp4", frames, 8)
    (root / "videos" / "halves.txt").write_text("red then blue")
    (root / "images" / "img_00000.txt").unlink()  # no sidecar: a captioner must stand in
    return root


@pytest.fixture(scope="module")
def prepared(corpus: Path, captioners: dict) -> dict[str, np.ndarray]:
    cfg = captioning_config(captioners, corpus)
    rows = discover(corpus, samples_per_shard=64)
    batch = CaptionSidecar(cfg)(ProbeMedia(cfg)(to_batch(rows)))
    batch["clip_start_s"] = np.array([0.0] * len(rows))
    batch["clip_end_s"] = np.array([float(d) for d in batch["duration_s"]])
    batch["clip_index"] = np.array([-1] * len(rows))
    ok = [i for i, r in enumerate(batch["relpath"]) if batch["modality"][i] != "unknown" and r != "corpus.json"]
    return CaptionPrep(cfg)({k: v[ok] for k, v in batch.items()})


def test_prep_decodes_frames_and_16k_audio(prepared: dict) -> None:
    rows = by_relpath(prepared)
    for relpath, row in rows.items():
        assert row["status"] == "ok", (relpath, row["message"])
        if row["modality"] == "audio":
            wave = load_npy(row[AUDIO_COLUMN])
            assert wave.dtype == np.float32 and wave.ndim == 1 and row[FRAMES_COLUMN] == b""
            assert abs(len(wave) - 16000 * min(row["duration_s"], 2.0)) <= 2  # resampled from its own rate
            assert np.abs(wave).max() > 0.05
        else:
            frames = load_npy(row[FRAMES_COLUMN])
            assert frames.dtype == np.uint8 and frames.shape[1:] == (32, 32, 3) and row[AUDIO_COLUMN] == b""
            assert len(frames) == (1 if row["modality"] == "image" else min(3, row["num_frames"]))  # no repeats
    assert {r["sample_rate"] for r in rows.values() if r["modality"] == "audio"} >= {8000, 16000}


def test_prep_respects_the_clip_span(prepared: dict, captioners: dict, corpus: Path) -> None:
    row = {k: v for k, v in by_relpath(prepared)["videos/halves.mp4"].items()}
    whole = load_npy(row[FRAMES_COLUMN]).astype(float)
    assert whole[0, ..., 0].mean() > 150 and whole[-1, ..., 2].mean() > 150  # starts red, ends blue
    second_half = {**row, "clip_start_s": 1.0, "clip_end_s": 2.0, "clip_index": 1}
    out = CaptionPrep(captioning_config(captioners, corpus))(to_batch([second_half]))
    frames = load_npy(out[FRAMES_COLUMN][0]).astype(float)
    assert frames[..., 2].mean() > 150 and frames[..., 0].mean() < 60


def test_frame_times_never_ask_for_more_frames_than_the_span_holds() -> None:
    assert len(frame_times(0.0, 2.0, 8.0, 3)) == 3
    assert list(frame_times(1.0, 1.25, 8.0, 3)) == [1.0625, 1.1875]  # 0.25 s at 8 fps holds 2 frames
    assert list(frame_times(1.0, 1.05, 8.0, 3)) == [1.025]  # never none


def test_prep_rejects_an_undecodable_file_with_its_reason(prepared: dict, captioners: dict, tmp_path: Path) -> None:
    row = dict(by_relpath(prepared)["videos/halves.mp4"])
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(Path(row["uri"]).read_bytes()[:300])
    out = CaptionPrep(captioning_config(captioners, tmp_path))(to_batch([{**row, "uri": str(broken)}]))
    assert (out["status"][0], out["stage"][0]) == ("rejected", "caption_prep")
    assert out["reason"][0] in {"decode_error", "no_content"}


def test_vlm_captions_visual_rows_and_cleans_them(prepared: dict, captioners: dict, corpus: Path) -> None:
    raw = by_relpath(CaptionVLM(captioning_config(captioners, corpus, vlm={"prompt": "a picture of"}, clean={"enabled": False}))(
        dict(prepared)))
    cleaned = by_relpath(CaptionVLM(captioning_config(captioners, corpus, vlm={"prompt": "a picture of"}))(dict(prepared)))
    assert FRAMES_COLUMN not in next(iter(cleaned.values()))  # consumed, so it never reaches the shards
    for relpath, row in cleaned.items():
        if row["modality"] == "audio":
            assert row["caption_generated"] == ""
            continue
        assert raw[relpath]["caption_generated"].startswith("a picture of"), raw[relpath]["caption_generated"]
        text = row["caption_generated"]
        assert isinstance(text, str) and text and not text.lower().startswith("a picture of"), text
        if row["modality"] == "video":  # one caption per frame, merged; never more parts than frames
            assert 1 <= len(text.split(", then ")) <= 3


def test_a_failing_vlm_batch_is_recorded_not_fatal(prepared: dict, captioners: dict, corpus: Path) -> None:
    from latentforge.datasets.shards import npy_bytes

    batch = {k: v.copy() for k, v in prepared.items()}
    visual = [i for i, m in enumerate(batch["modality"]) if m != "audio"]
    batch[FRAMES_COLUMN][visual[0]] = npy_bytes(np.zeros((1, 4), np.uint8))  # not an image
    out = CaptionVLM(captioning_config(captioners, corpus))(batch)
    bad = visual[0]
    assert out["status"][bad] == "ok" and out["caption_generated"][bad] == ""
    assert "vlm: " in out["caption_error"][bad]
    for i in visual[1:]:  # the batch failed; the other rows are captioned one by one
        assert out["status"][i] == "ok" and out["caption_generated"][i] and not out["caption_error"][i]


def test_whisper_transcribes_audio_rows(prepared: dict, captioners: dict, corpus: Path) -> None:
    out = by_relpath(CaptionAudio(captioning_config(captioners, corpus))(dict(prepared)))
    for row in out.values():
        assert AUDIO_COLUMN not in row
        if row["modality"] == "audio":
            assert isinstance(row["caption_audio"], str) and row["caption_audio"].strip(), row
        else:
            assert row["caption_audio"] == ""


def select(captioners: dict, rows: list[dict], **captioning) -> dict[str, np.ndarray]:
    base = {"status": "ok", "reason": "", "message": "", "stage": "", "caption": "", "caption_origin": "",
            "caption_sidecar": "", "caption_generated": "", "caption_audio": "", "caption_error": ""}
    return CaptionSelect(captioning_config(captioners, **captioning))(to_batch([{**base, **r} for r in rows]))


def test_select_follows_the_policy_and_keeps_every_source(captioners: dict) -> None:
    rows = [{"id": "a", "caption_sidecar": "alt text", "caption_generated": "a red circle"},
            {"id": "b", "caption_generated": "a red circle", "caption_audio": "hello"},
            {"id": "c", "caption_audio": "hello"}]
    out = select(captioners, rows)
    assert list(out["caption"]) == ["alt text", "a red circle", "hello"]
    assert list(out["caption_origin"]) == ["sidecar", "vlm", "audio"]
    assert list(out["caption_sidecar"]) == ["alt text", "", ""]
    assert list(out["score_caption_words"]) == [2.0, 3.0, 1.0]
    out = select(captioners, rows, prefer=["vlm", "sidecar", "audio"])
    assert list(out["caption"]) == ["a red circle", "a red circle", "hello"]


def test_select_rejects_a_row_without_any_caption(captioners: dict) -> None:
    out = select(captioners, [{"id": "a", "caption_error": "sidecar: missing_caption: no file; vlm: empty caption"}],
                 prefer=["sidecar", "vlm", "audio"])
    assert (out["status"][0], out["reason"][0], out["stage"][0]) == ("rejected", "no_caption", "caption_select")
    assert "missing_caption" in out["message"][0]


def test_sidecar_cleaning_is_opt_in_and_the_original_is_kept(captioners: dict) -> None:
    rows = [{"id": "a", "caption_sidecar": "An image of a house"}]
    assert select(captioners, rows)["caption"][0] == "An image of a house"
    out = select(captioners, rows, clean={"clean_sidecar": True})
    assert out["caption"][0] == "a house" and out["caption_sidecar"][0] == "An image of a house"


def test_missing_sidecar_is_recorded_not_rejected_when_a_captioner_is_on(prepared: dict) -> None:
    row = by_relpath(prepared)["images/img_00000.png"]
    assert (row["status"], row["caption"], row["caption_sidecar"]) == ("ok", "", "")
    assert row["caption_error"].startswith("sidecar: missing_caption")
    kept = by_relpath(prepared)["videos/halves.mp4"]
    assert kept["caption_sidecar"] == kept["caption"] and kept["caption_origin"] == "sidecar" and kept["caption"]


def test_missing_sidecar_still_rejects_without_captioners(prepared: dict) -> None:
    row = dict(by_relpath(prepared)["images/img_00000.png"])
    out = CaptionSidecar(CurationConfig())(to_batch([{**row, "status": "ok"}]))
    assert (out["status"][0], out["reason"][0]) == ("rejected", "missing_caption")


def test_captioning_config_errors_name_the_key(captioners: dict) -> None:
    with pytest.raises(ValidationError, match=r"captioning\.vlm\.num_beam"):
        CurationConfig(captioning={"vlm": {"num_beam": 2}})
    with pytest.raises(ValidationError, match="not in prefer"):
        CurationConfig(captioning={"audio": {"enabled": True}, "prefer": ["sidecar", "vlm"]})
    with pytest.raises(ValidationError, match=r"captioning\.vlm\.family"):
        CurationConfig(captioning={"vlm": {"family": "llava"}})


def test_stage_graph_shows_captioners_only_when_enabled(captioners: dict) -> None:
    names = [n for r in stage_graph(CurationConfig()) for n in r["stages"]]
    assert not any(n.startswith("caption_") and n != "caption_sidecar" for n in names)
    cfg = CurationConfig.model_validate({**captioning_config(captioners).model_dump(),
                                         "resources": {"caption_vlm": {"num_gpus": 1.0, "num_cpus": 1.0}}})
    graph = {n: r for r in stage_graph(cfg) for n in r["stages"]}  # stage -> the map it runs in
    order = [n for r in stage_graph(cfg) for n in r["stages"]]
    assert order.index("caption_prep") < order.index("caption_vlm") < order.index("caption_select") < \
        order.index("encode_latents")
    # The GPU captioner is a map of its own; the CPU preparation before it and the audio captioner after it
    # are fused with the CPU stages around them.
    assert graph["caption_vlm"]["stages"] == ["caption_vlm"] and graph["caption_vlm"]["num_gpus"] == 1.0
    assert "caption_prep" in graph["filter_sharpness"]["stages"] and graph["caption_audio"]["num_gpus"] == 0.0
    only_audio = captioning_config(captioners, vlm={"enabled": False})
    assert [s.name for s in active_stages(STAGES, only_audio) if s.name.startswith("caption")] == \
        ["caption_prep", "caption_audio", "caption_select"]


# ---- Florence-2 and Qwen2-VL: transformers' native classes on tiny random-weight checkpoints ----

@pytest.fixture(scope="module")
def vlms(tmp_path_factory) -> dict[str, str]:
    from tiny_captioners import save_tiny_florence2, save_tiny_qwen2_vl

    root = tmp_path_factory.mktemp("vlms")
    return {"florence2": save_tiny_florence2(root / "florence2"), "qwen2_vl": save_tiny_qwen2_vl(root / "qwen2_vl")}


def vlm_config(captioners: dict, vlms: dict, family: str, **vlm) -> CurationConfig:
    return captioning_config(captioners, vlm={"family": family, "model": vlms[family], "max_new_tokens": 6, **vlm},
                  clean={"enabled": False})


@pytest.mark.parametrize("family", ["florence2", "qwen2_vl"])
def test_vlm_family_captions_images_and_clips(family: str, prepared: dict, captioners: dict, vlms: dict) -> None:
    from tiny_captioners import BLIP_WORDS

    out = by_relpath(CaptionVLM(vlm_config(captioners, vlms, family))(dict(prepared)))
    visual = {r: row for r, row in out.items() if row["modality"] != "audio"}
    assert {row["modality"] for row in visual.values()} == {"image", "video"}
    for relpath, row in out.items():
        text = row["caption_generated"]
        assert isinstance(text, str)
        if row["modality"] == "audio":
            assert text == "" and row["caption_error"] == ""
            continue
        parts = text.split(", then ")
        assert text and 1 <= len(parts) <= (1 if row["modality"] == "image" else 3), (relpath, text)
        # Only the new tokens, decoded without specials: no prompt, task token or chat markup, just caption words.
        assert set(" ".join(parts).split()) <= set(BLIP_WORDS), (relpath, text)


@pytest.mark.parametrize("family", ["florence2", "qwen2_vl"])
def test_vlm_family_batches_frames_like_one_at_a_time(family: str, captioners: dict, vlms: dict) -> None:
    from latentforge.pipelines.stages.caption_vlm import CAPTIONERS

    rng = np.random.default_rng(0)
    # Two sizes: Qwen2-VL gives them different token counts, so a batch pads (on the left) and must not change them.
    frames = [rng.integers(0, 256, (32, 32, 3), np.uint8) for _ in range(3)] + \
        [rng.integers(0, 256, (48, 32, 3), np.uint8) for _ in range(2)]
    cfg = vlm_config(captioners, vlms, family, chunk=4).captioning.vlm
    captioner = CAPTIONERS[family](cfg)
    batched = captioner.caption(frames)  # 5 frames: one call of 4, one of 1
    assert batched == [captioner.caption([f])[0] for f in frames]
    assert all(isinstance(t, str) and t and t == t.strip() and "<" not in t for t in batched), batched


def test_qwen2_vl_runs_in_bfloat16(captioners: dict, vlms: dict) -> None:
    from latentforge.pipelines.stages.caption_vlm import Qwen2VLCaptioner

    captioner = Qwen2VLCaptioner(vlm_config(captioners, vlms, "qwen2_vl", dtype="bfloat16").captioning.vlm)
    assert next(captioner.model.parameters()).dtype == captioner.torch.bfloat16
    assert captioner.caption([np.full((32, 32, 3), 200, np.uint8)])[0]


def test_qwen2_vl_without_a_chat_template_falls_back_to_the_same_prompt(captioners: dict, vlms: dict,
                                                                       tmp_path: Path) -> None:
    """A checkpoint whose tokenizer has no chat template (older exports) gets Qwen2-VL's turn format written out
    by hand: the same text the template renders, so it captions the same."""
    import json
    import shutil

    from latentforge.pipelines.stages.caption_vlm import Qwen2VLCaptioner

    bare = tmp_path / "qwen2_vl_no_template"
    shutil.copytree(vlms["qwen2_vl"], bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    for name in ("tokenizer_config.json", "chat_template.json"):
        path = bare / name
        if path.exists():
            data = json.loads(path.read_text())
            data.pop("chat_template", None)
            path.write_text(json.dumps(data))
    templated = Qwen2VLCaptioner(vlm_config(captioners, vlms, "qwen2_vl").captioning.vlm)
    fallback = Qwen2VLCaptioner(vlm_config(captioners, {"qwen2_vl": str(bare)}, "qwen2_vl").captioning.vlm)
    assert templated.tokenizer.chat_template and not fallback.tokenizer.chat_template
    assert fallback.text == templated.text  # the hand-written turn is what the template renders
    frames = [np.full((32, 32, 3), v, np.uint8) for v in (40, 200)]
    assert fallback.caption(frames) == templated.caption(frames)


def test_vlm_family_bad_model_or_prompt_is_a_clear_error(captioners: dict, vlms: dict, tmp_path: Path) -> None:
    from latentforge.pipelines.stages.caption_vlm import Florence2Captioner, Qwen2VLCaptioner

    def cfg(family: str, **vlm):
        return vlm_config(captioners, vlms, family, **vlm).captioning.vlm

    with pytest.raises(ValueError, match=r"captioning\.vlm\.model=.*missing.*no such directory"):
        Florence2Captioner(cfg("florence2", model=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"captioning\.vlm\.model=.*empty.*cannot load"):
        Qwen2VLCaptioner(cfg("qwen2_vl", model=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match=r"family qwen2_vl.*'blip' model"):
        Qwen2VLCaptioner(cfg("qwen2_vl", model=captioners["blip"]))
    with pytest.raises(ValueError, match=r"captioning\.vlm\.prompt='<CAPTION> of a cat'"):
        Florence2Captioner(cfg("florence2", prompt="<CAPTION> of a cat"))


def test_vlm_family_defaults_replace_blips() -> None:
    from latentforge.pipelines.stages.caption_vlm import VLMCaptionConfig

    assert VLMCaptionConfig(family="florence2").model == "florence-community/Florence-2-base"
    assert VLMCaptionConfig(family="qwen2_vl").image_size == 448
    assert VLMCaptionConfig(family="qwen2_vl", model="/m", image_size=64).model_dump()["image_size"] == 64
    assert VLMCaptionConfig().model == "Salesforce/blip-image-captioning-base"
