"""The runs' descriptions in the MLflow UI, from a curation result and a stage's config."""
from __future__ import annotations

from pathlib import Path

from latentforge.orchestration.notes import curation_note, plan_note, stage_note
from latentforge.pipelines.curate import CurationResult
from latentforge.training.config import TrainStageConfig


def result(**kw) -> CurationResult:
    base = dict(dataset_dir=Path("/w/datasets/demo"), inputs=112, kept=94, rejected=12, filtered=6,
                reasons={"decode_error": 4, "duplicate_exact": 2, "empty_file": 1, "too_large": 1, "no_content": 1,
                         "missing_caption": 1, "caption_not_utf8": 1},
                by_modality={"image": 50, "video": 29, "audio": 15},
                card={"id": "demo-1234", "shards": [{}, {}, {}]}, samples=112)
    return CurationResult(**{**base, **kw})


def test_a_curation_note_gives_the_counts_the_top_reasons_and_where_to_look() -> None:
    note = curation_note(result())
    assert note.splitlines()[0] == "**Curated 94 of 112 samples** into `/w/datasets/demo`, dataset id `demo-1234`."
    assert curation_note(result(samples=130)).startswith("**Curated 94 of 130 samples** (clips of 112 inputs) into")
    assert "- kept: image 50, video 29, audio 15; 3 shards" in note
    assert "- left out: 12 rejected, 6 filtered; most often decode_error 4, duplicate_exact 2" in note
    assert "(and 2 more reasons)" in note and "report.html" in note and "rejects.parquet" in note
    assert "readmitted" not in note
    clean = curation_note(result(rejected=0, filtered=0, reasons={}, readmitted=3))
    assert "- left out:" not in clean and "- readmitted: 3 near duplicates" in clean


def test_a_stage_note_names_its_data_its_start_and_its_end() -> None:
    stage = TrainStageConfig(name="finetune", modalities=["image", "audio"], steps=150, batch_size=8,
                             where="aesthetic > 5", val_fraction=0.1)
    lineage = {"datasets": [{"id": "demo-1234"}, {"id": "more-99"}]}
    note = stage_note(stage, lineage, {"loss": 0.95946, "step": 150}, Path("/ck/run/checkpoint_1"))
    assert note.splitlines()[0] == ("**Stage `finetune`**: 150 steps of batch 8 on image, audio from `demo-1234`, "
                                    "`more-99`, starting from the previous stage's final checkpoint "
                                    "(`/ck/run/checkpoint_1`).")
    assert "- samples chosen by `aesthetic > 5`" in note
    assert "- final loss 0.9595 (per modality: `loss/<modality>`; held-out samples: `val_loss`)" in note
    first = stage_note(TrainStageConfig(name="a", modalities=["image"], steps=5), lineage, {}, None)
    assert "starting from scratch." in first and "final loss" not in first and "chosen by" not in first


def test_a_plan_note_lists_its_runs_in_order_and_the_registered_model() -> None:
    assert plan_note("qs", "curate-demo", ["train-a", "train-b"], ("qs", "3")) == (
        "**Plan `qs`**: curation `curate-demo` -> `train-a` -> `train-b`, one nested run each.\n\n"
        "- registered model `qs` version 3")
    assert plan_note("qs", None, [], None) == "**Plan `qs`**: nothing yet, one nested run each."
