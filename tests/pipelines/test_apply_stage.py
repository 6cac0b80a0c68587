"""Which stages run as Ray tasks (no state) and which in actor pools, and that the task form is the stage."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from lf_batches import to_batch
from PIL import Image

from latentforge.pipelines.config import CurationConfig
from latentforge.pipelines.discover import discover
from latentforge.pipelines.stage import TIMING_COLUMN, Segment, holds_state, stage_resources, stateless_task
from latentforge.pipelines.stages.encode_text import EncodeText
from latentforge.pipelines.stages.filter_basic import FilterBasic
from latentforge.pipelines.stages.filter_text_area import FilterTextArea
from latentforge.pipelines.stages.probe_media import ProbeMedia
from latentforge.pipelines.stages.score_aesthetic import ScoreAesthetic


def test_stages_that_load_a_model_keep_actors_and_the_rest_run_as_tasks() -> None:
    assert [holds_state(s) for s in (ProbeMedia, FilterBasic)] == [False, False]
    assert [holds_state(s) for s in (FilterTextArea, ScoreAesthetic, EncodeText)] == [True, True, True]


def test_the_task_form_is_named_after_the_stage_and_gives_the_same_batch(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"")
    cfg = CurationConfig(input_dir=tmp_path)
    batch = to_batch(discover(tmp_path, 8))
    task = stateless_task(Segment((ProbeMedia,), stage_resources(ProbeMedia, cfg)))
    assert task.__name__ == "ProbeMedia"
    got, expected = task(batch, cfg), ProbeMedia(cfg)(batch)
    assert got.pop(TIMING_COLUMN) is not None  # the task form also times the stage (stage.with_timing)
    assert got.keys() == expected.keys()
    assert all(list(got[k]) == list(expected[k]) for k in got)
    assert list(got["status"]) == ["ok", "rejected"]
