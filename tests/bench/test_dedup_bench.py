"""bench/dedup.py runs, and its two searches (numpy now, Python sets before) mark the same duplicates."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "dedup.py"


def test_a_small_run_times_both_searches_which_agree():
    out = subprocess.run([sys.executable, str(BENCH), "--rows", "500", "3000", "--baseline-max", "3000"],
                         capture_output=True, text=True, timeout=300, check=True).stdout  # exits 1 on disagreement
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["hashes"] for r in rows] == [500, 3000]
    for r in rows:
        assert r["rows"] == r["hashes"] * 23 // 20 and r["duplicates"] >= r["hashes"] // 20  # the exact copies
        assert r["numpy_s"] >= 0 and r["previous_s"] >= 0 and r["speedup"] > 0
