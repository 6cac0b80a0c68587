"""The tables a curation prints when it ends: why samples were left out, and where the time went."""
from __future__ import annotations

from rich.console import Console

from latentforge.datasets import manifest as mf
from latentforge.orchestration.run import reasons_table, stage_time_table


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
