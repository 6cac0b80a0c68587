"""Benches that run in seconds at a small size, each checking its sides agree: bench/dedup.py (the dedup pass in
columns, one dict per row, and the first Python index), bench/plan_memory.py (a selection as columns vs
objects), bench/metadata.py (the job's metadata rows on the driver), bench/discover.py (the inputs listed on
the driver), bench/markers.py (done-markers read by threads on moto) and bench/fit_overhead.py (a stage's fixed
cost on Ray Train, Ray's controller poll vs ours)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHES = Path(__file__).resolve().parents[2] / "bench"


def test_a_small_run_times_the_three_passes_which_agree():
    out = subprocess.run([sys.executable, str(BENCHES / "dedup.py"), "--rows", "500", "3000", "--baseline-max", "3000"],
                         capture_output=True, text=True, timeout=300, check=True).stdout  # exits 1 on disagreement
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["hashes"] for r in rows] == [500, 3000]
    for r in rows:
        assert r["rows"] == r["hashes"] * 23 // 20 and r["duplicates"] >= r["hashes"] // 20  # the exact copies
        assert r["columns_s"] >= 0 and r["dicts_s"] >= 0 and r["first_index_s"] >= 0 and r["speedup"] > 0
        assert 0 < r["columns_peak_mb"] and 0 <= r["table_mb"] < r["dicts_held_mb"]


def test_a_small_selection_is_measured_both_ways_and_agrees(tmp_path):
    out = subprocess.run([sys.executable, str(BENCHES / "plan_memory.py"), "--samples", "5000", "--dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, check=True).stdout  # exits 1 on disagreement
    result = json.loads(out.splitlines()[-1])
    assert result["samples"] == 5000
    for side in ("previous_entry_objects", "numpy_columns"):
        assert result[side]["s"] >= 0 and result[side]["peak_mb"] >= result[side]["held_mb"] > 0
    assert result["numpy_columns"]["held_mb"] < result["previous_entry_objects"]["held_mb"]


def test_a_small_metadata_tail_is_measured_and_both_sides_write_the_same_dataset():
    """bench/metadata.py on 2,000 rows, with this checkout as its own 'before' (the comparison still runs: each
    side in its own process, their manifests, rejects tables and cards compared by digest)."""
    here = BENCHES.parent
    out = subprocess.run([sys.executable, str(BENCHES / "metadata.py"), "--rows", "2000", "--before", str(here)],
                         capture_output=True, text=True, timeout=300, check=True).stdout  # exits 1 on disagreement
    row = json.loads(out.splitlines()[-1])
    assert row["rows"] == 2000 and row["same_output"] is True
    for side in ("now", "before"):
        r = row[side]
        assert r["kept"] > 1500 and r["readmitted"] > 0 and r["peak_mb"] >= r["held_mb"] >= 0
        assert r["collect_s"] >= 0 and r["write_s"] >= 0


def test_a_small_listing_is_measured_and_both_sides_agree(tmp_path):
    """bench/discover.py on a tree of 3,000 files, this checkout as its own 'before': each side in its own
    process, their inputs, groups and digest compared."""
    here = BENCHES.parent
    out = subprocess.run([sys.executable, str(BENCHES / "discover.py"), "--inputs", "3000", "--per-dir", "500",
                          "--tree", str(tmp_path), "--before", str(here)],
                         capture_output=True, text=True, timeout=300, check=True).stdout  # exits 1 on disagreement
    row = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert row["now"]["inputs"] == row["before"]["inputs"] == 3000 and "same inputs, groups and digest: True" in out
    assert row["now"]["digest"] == row["before"]["digest"] and len(row["now"]["digest"]) == 16
    assert all(row["now"][k] >= 0 for k in ("list_s", "digest_s", "regroup_s", "table_s", "held_mb"))
    assert len(list(tmp_path.rglob("*.txt"))) == 1500  # every other input has its caption


def test_a_few_markers_on_moto_are_read_both_ways_alike():
    """bench/markers.py at 20 groups, one round, a modelled 5 ms round trip: both ways return the same groups."""
    out = subprocess.run([sys.executable, str(BENCHES / "markers.py"), "--groups", "20", "--rounds", "1",
                          "--latency-ms", "5"], capture_output=True, text=True, timeout=300, check=True).stdout
    row = json.loads(out.splitlines()[-1])
    assert row["groups"] == 20 and row["rows"] == 20 * 64 and row["same"] is True
    assert row["one_s"][0] > 20 * 0.005 and row["speedup"] > 0  # every read waited its 5 ms in the one-reader way


def test_one_round_of_the_fit_overhead_bench_trains_both_sides():
    out = subprocess.run([sys.executable, str(BENCHES / "fit_overhead.py"), "--rounds", "1"],
                         capture_output=True, text=True, timeout=600, check=True).stdout
    result = json.loads(out.splitlines()[-1])
    assert [len(t) for t in result["each_round"].values()] == [1, 1]
    assert result["ray_default_s"] > 0 and result["ours_s"] > 0 and result["ratio_default_over_ours"] > 0
