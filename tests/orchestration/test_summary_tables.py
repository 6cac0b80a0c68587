"""What a run prints when it ends: why samples were left out, where the time went, where things are."""
from __future__ import annotations

import os

from rich.console import Console

from latentforge.datasets import manifest as mf
from latentforge.orchestration.tables import reasons_table, stage_time_table


def render(table) -> str:
    console = Console(record=True, width=200)
    console.print(table)
    return console.export_text()


def test_reasons_are_counted_most_frequent_first_with_an_example(tmp_path):
    rows = ([{"id": f"b{i}", "relpath": f"broken/b{i}.mp4", "status": "rejected", "stage": "probe",
              "reason": "decode_error"} for i in range(3)]
            + [{"id": f"s{i}", "relpath": f"small{i}.png", "status": "filtered", "stage": "filter_basic",
                "reason": "resolution_below_min"} for i in range(2)]
            + [{"id": f"r{i}", "relpath": f"rare{i}.wav", "status": "rejected", "stage": "probe",
                "reason": f"rare_{i}"} for i in range(3)])
    mf.write_table(mf.to_table(rows, mf.REJECTS_SCHEMA), tmp_path / mf.REJECTS)
    lines = render(reasons_table(tmp_path, most=2)).splitlines()
    body = [line for line in lines if "decode_error" in line or "resolution" in line or "more" in line]
    assert "decode_error" in body[0] and " 3 " in body[0] and "broken/b0.mp4" in body[0]
    assert "resolution_below_min" in body[1] and " 2 " in body[1] and "small0.png" in body[1]
    assert "3 more reasons" in body[2] and " 3 " in body[2]  # the three rare ones, one sample each


def test_stage_times_show_each_stage_share():
    text = render(stage_time_table({"probe": {"cpu_s": 3.0, "wall_s": 2.0}, "encode": {"cpu_s": 1.0, "wall_s": 1.5}}))
    assert "75%" in text and "25%" in text and "probe" in text


def test_the_run_summary_keeps_every_path_whole_on_an_80_column_terminal(tmp_path, monkeypatch):
    """The paths are what people copy from it; a table at rich's 80 columns (a log, a small terminal) cut them."""
    from latentforge.orchestration import cli
    from latentforge.orchestration.config import LatentforgeConfig, resolve_paths
    from latentforge.orchestration.run import RunSummary

    cfg = resolve_paths(LatentforgeConfig.model_validate({
        "name": "plan", "workdir": str(tmp_path / "work"), "curation": {"name": "demo", "input_dir": "corpus"}}),
        tmp_path)
    checkpoint = tmp_path / "work" / "checkpoints" / "quickstart-image_pretrain-df4b4fff" / "checkpoint_2026-11-28"
    export = tmp_path / "work" / "exports" / "a stage with spaces"
    summary = RunSummary(parent_run_id="4b68fd5968f2402eaca6a09628afcb2f", experiment_id="1",
                         dataset_dirs=[tmp_path / "work" / "datasets" / "demo"],
                         checkpoints={"image_pretrain": checkpoint}, exports={"finetune": export},
                         registered=("quickstart", "1"))
    console = Console(width=80, record=True, file=open(os.devnull, "w"))
    monkeypatch.setattr(cli, "console", console)
    cli._print_summary(cfg, summary)
    lines = console.export_text().splitlines()
    assert len(str(checkpoint)) > 80 - len("checkpoint (image_pretrain)")  # too long for a table's value column
    assert any(line.split() == ["checkpoint", "(image_pretrain)", str(checkpoint)] for line in lines)
    assert any(line.endswith(f"  {tmp_path / 'work' / 'datasets' / 'demo'}") for line in lines)
    assert any(line.endswith(f"latentforge generate '{export}' -p \"a red circle\" --out generated") for line in lines)
    assert any(line.split() == ["registered", "model", "quickstart", "v1"] for line in lines)
    assert "…" not in "\n".join(lines)


def test_the_manifest_summary_counts_samples_per_modality_and_bucket():
    import pyarrow as pa

    from latentforge.orchestration.tables import manifest_summary

    manifest = pa.table({"id": list("abcdefg"),
                         "modality": ["video", "image", "image", "audio", "image", None, "video"],
                         "bucket": ["4x8x8", "1x8x8", "1x16x16", "8000", "1x8x8", "1x8x8", "4x8x8"],
                         "score_x": [1.0] * 7})
    assert manifest_summary(manifest).to_pylist() == [
        {"modality": "audio", "bucket": "8000", "samples": 1}, {"modality": "image", "bucket": "1x16x16", "samples": 1},
        {"modality": "image", "bucket": "1x8x8", "samples": 2}, {"modality": "video", "bucket": "4x8x8", "samples": 2}]
