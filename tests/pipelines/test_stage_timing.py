"""Per-stage time follows the rows through chains, re-batching and clip splitting, and sums to what was spent."""
from __future__ import annotations

import json

import numpy as np
import pytest

from latentforge.pipelines.stage import TIMING_COLUMN, add_timing, batch_of, rows_of, with_timing


def test_shares_follow_rows_through_rebatching_and_sum_to_the_time_spent() -> None:
    batch = batch_of([{"id": str(i)} for i in range(4)])
    first = with_timing(batch, {"probe": (4.0, 8.0)})  # one batch of 4 rows
    rows = rows_of(first)
    second = [with_timing(batch_of(rows[i:i + 2]), {"encode": (2.0, 1.0)}) for i in (0, 2)]  # cut into 2 + 2
    totals: dict[str, list[float]] = {}
    out = [r for b in second for r in rows_of(b)]
    for row in out:
        add_timing(totals, row)
    assert totals == {"probe": pytest.approx([4.0, 8.0]), "encode": pytest.approx([4.0, 2.0])}
    assert list(totals) == ["probe", "encode"]  # in the order the stages ran
    assert all(TIMING_COLUMN not in row for row in out)  # taken off the rows before they are written


def test_a_flat_map_splits_its_time_over_the_rows_it_made() -> None:
    clips = batch_of([{"id": f"v{k}"} for k in range(6)])  # one input split into 6 clips in the same chain
    totals: dict[str, list[float]] = {}
    for row in rows_of(with_timing(clips, {"split_clips": (3.0, 3.0)})):
        add_timing(totals, row)
    assert totals == {"split_clips": pytest.approx([3.0, 3.0])}


def test_an_empty_batch_and_a_row_without_timing() -> None:
    empty = {"id": np.array([], dtype=object)}
    assert with_timing(empty, {"probe": (1.0, 1.0)}) is empty
    totals: dict[str, list[float]] = {}
    add_timing(totals, {"id": "x"})  # e.g. a group an earlier run finished
    assert totals == {}
    row = rows_of(with_timing(batch_of([{"id": "a"}]), {"probe": (0.5, 0.25)}))[0]
    assert json.loads(row[TIMING_COLUMN]) == {"probe": [0.5, 0.25]}
