"""A resumed stage reads on from the checkpoint's saved data position, not from step x grad_accum: a stage
resumed with another grad_accum (halved after an OOM, say) neither replays nor skips batches, and one resumed
with another world size is warned and keeps the same share of the epoch.

`train_stage` runs in this process (one CPU worker) with ray.train's session calls replaced: `get_checkpoint`
hands back a checkpoint the previous run reported, `report` keeps a copy of each checkpoint.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import ray.train
from test_loader import make_sample, write_dataset

from latentforge.training import checkpoint as ckpt
from latentforge.training import loop
from latentforge.training.config import TrainStageConfig
from latentforge.training.dit import DiT, DiTConfig

BUILD_STREAM = loop.build_stream
MODEL = {"hidden": 32, "depth": 1, "heads": 2, "visual_channels": 12, "text_dim": 4, "max_text_len": 6}


def stage(**kw) -> TrainStageConfig:
    return TrainStageConfig(**{"name": "s", "modalities": ["image"], "batch_size": 2, "checkpoint_every": 1,
                               "log_every": 1, "num_samples": 0, "loader": {"workers": 0, "shuffle_buffer": 4}, **kw})


@pytest.fixture
def dataset(tmp_path: Path) -> str:
    return str(write_dataset(tmp_path / "ds", [make_sample(i, "image") for i in range(12)]).root)


def run(monkeypatch, tmp_path: Path, dataset: str, st: TrainStageConfig, resume_from: Path | None = None):
    """One in-process `train_stage`; returns (stream start, captions of the batches consumed, checkpoints)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    out = tmp_path / f"run-{len(list(tmp_path.glob('run-*')))}"
    checkpoints: list[Path] = []
    starts: list[int] = []
    consumed: list[list[str]] = []

    def report(metrics, checkpoint=None):
        if checkpoint is not None:
            checkpoints.append(Path(shutil.copytree(checkpoint.path, out / f"step-{metrics['step']}")))

    class Recording:
        def __init__(self, stream):
            self.stream = stream

        def __next__(self):
            batch = next(self.stream)
            consumed.append(batch.captions)
            return batch

    def build_stream(plan, rank, start=0):
        starts.append(start)
        return Recording(BUILD_STREAM(plan, rank, start))

    monkeypatch.setattr(ray.train, "report", report)
    monkeypatch.setattr(ray.train, "get_checkpoint",
                        lambda: None if resume_from is None else ray.train.Checkpoint.from_directory(str(resume_from)))
    monkeypatch.setattr(loop, "build_stream", build_stream)
    loop.train_stage({"job": loop.StageJob(stage=st, model=MODEL, datasets=[dataset], seed=3)})
    return starts[0], consumed, checkpoints


def state_of(checkpoint: Path) -> dict:
    return json.loads((checkpoint / ckpt.STATE).read_text())


def test_a_stage_resumed_with_another_grad_accum_reads_on_where_it_stopped(monkeypatch, tmp_path, dataset):
    _, straight, _ = run(monkeypatch, tmp_path, dataset, stage(steps=2, grad_accum=2))
    assert len(straight) == 4 and len({tuple(c) for c in straight}) == 4

    start, first, saved = run(monkeypatch, tmp_path, dataset, stage(steps=1, grad_accum=2))
    assert start == 0 and first == straight[:2]
    assert state_of(saved[-1])["data_position"] == 2

    start, rest, resumed = run(monkeypatch, tmp_path, dataset, stage(steps=3, grad_accum=1), resume_from=saved[-1])
    assert start == 2  # the saved position, not step 1 x grad_accum 1
    assert first + rest == straight  # no batch read twice, none skipped
    assert [state_of(c)["data_position"] for c in resumed] == [3, 4]  # counted on from there
    assert state_of(resumed[-1]) == {"step": 3, "stage": "s", "data_position": 4, "loader_workers": 0,
                                     "world_size": 1}


def restored(tmp_path: Path, state: dict, world: int = 1, **kw) -> tuple[int, int]:
    """`loop.restore` of a checkpoint written with `state`."""
    raw = DiT(DiTConfig.from_dict(MODEL))
    ema = copy.deepcopy(raw)
    optimizer, scheduler = loop.build_optimizer(raw, stage())
    ckpt.save_checkpoint(tmp_path, raw, ema, optimizer, scheduler, state, MODEL)
    job = loop.StageJob(stage=stage(**kw), model=MODEL, datasets=[])
    with pytest.MonkeyPatch.context() as m:
        m.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(str(tmp_path)))
        return loop.restore(raw, ema, optimizer, scheduler, job, world)


def test_restore_returns_the_saved_position_or_derives_it_for_older_checkpoints(tmp_path):
    state = {"step": 12, "stage": "s", "data_position": 24, "loader_workers": 0, "world_size": 1}
    assert restored(tmp_path / "new", state, grad_accum=1) == (12, 24)
    older = {"step": 12, "stage": "s", "loader_workers": 0}  # written before data_position and world_size
    assert restored(tmp_path / "old", older, grad_accum=2) == (12, 24)


def test_a_world_size_change_is_warned_and_keeps_the_share_of_the_epoch(tmp_path, capsys):
    state = {"step": 12, "stage": "s", "data_position": 24, "loader_workers": 0, "world_size": 2}
    assert restored(tmp_path / "same", state, world=2) == (12, 24)
    assert "warning" not in capsys.readouterr().out
    # 2 ranks x 24 batches were read: 4 ranks read on from 12 each, 1 rank from 48
    assert restored(tmp_path / "grown", state, world=4) == (12, 12)
    out = capsys.readouterr().out
    assert "warning" in out and "written by 2 workers, resuming with 4" in out and "(was 24)" in out
    assert restored(tmp_path / "shrunk", state, world=1) == (12, 48)
    assert "written by 2 workers, resuming with 1" in capsys.readouterr().out
