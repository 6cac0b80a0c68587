"""The logged training metrics are the run's, not rank 0's: means over every rank's steps (a real two-process
gloo group), as the loop logs them and reports them to Ray Train."""
from __future__ import annotations

import itertools
import multiprocessing

import pytest
import torch

from latentforge.training.metrics import MODALITY_LOSSES, Meter, TimeLeft, duration, sum_over_ranks

# Per rank: the losses of its steps in one logging window, its samples per step, its REPA losses, and the
# modality of each step's batch (no rank reads a video: that metric is left out, not logged as 0).
LOSSES = {0: [1.0, 3.0], 1: [5.0, 9.0]}
SEEN = {0: 4, 1: 2}
REPA = {0: [-0.2, -0.4], 1: [-0.6, -0.8]}
MODALITY = {0: ["image", "image"], 1: ["image", "audio"]}
EXTRAS = ("train/repa_loss", *MODALITY_LOSSES)


def one_rank(rank: int, init: str, out) -> None:
    import torch.distributed as dist

    from latentforge.training import metrics

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    clock = itertools.chain([100.0], itertools.repeat(102.0))  # the window starts, and flushes 2 s later
    metrics.time = type("Clock", (), {"perf_counter": staticmethod(lambda: next(clock))})
    try:
        meter = Meter(EXTRAS)
        for loss, repa, modality in zip(LOSSES[rank], REPA[rank], MODALITY[rank]):
            meter.update(loss, SEEN[rank], {"train/repa_loss": repa, f"loss/{modality}": [loss]})
        window = meter.flush(torch.device("cpu"))
        step_loss = sum_over_ranks([LOSSES[rank][-1]], torch.device("cpu"))[0] / 2  # what report() sends Ray
        out.put((rank, window, step_loss))
    finally:
        dist.destroy_process_group()


def test_a_window_is_averaged_over_every_rank(tmp_path):
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    init = f"file://{tmp_path / 'rendezvous'}"
    workers = [context.Process(target=one_rank, args=(rank, init, out)) for rank in (0, 1)]
    for worker in workers:
        worker.start()
    for worker in workers:  # small results: a worker exits with them still in the queue
        worker.join(timeout=120)
        assert worker.exitcode == 0
    results = dict((rank, (window, step)) for rank, window, step in (out.get(timeout=10) for _ in workers))
    for rank in (0, 1):
        window, step_loss = results[rank]
        assert window["loss"] == pytest.approx((1 + 3 + 5 + 9) / 4)  # rank 0 alone: 2.0, rank 1 alone: 7.0
        assert window["train/repa_loss"] == pytest.approx(-0.5)
        assert window["loss/image"] == pytest.approx((1 + 3 + 5) / 3) and window["loss/audio"] == 9.0
        assert "loss/video" not in window
        assert window["samples_per_s"] == pytest.approx((2 * 4 + 2 * 2) / 2.0)  # both ranks' samples in 2 s
        assert step_loss == pytest.approx((3 + 9) / 2)


def test_outside_a_process_group_a_window_is_this_process_s():
    meter = Meter()
    for loss in (2.0, 4.0):
        meter.update(loss, 8)
    window = meter.flush()
    assert window["loss"] == 3.0 and window["samples_per_s"] > 0 and set(window) == {"loss", "samples_per_s"}
    assert sum_over_ranks([1.5, 2.0], None) == [1.5, 2.0]
    meter.update(10.0, 1)
    assert meter.flush()["loss"] == 10.0  # a flush starts a new window
    with pytest.raises(KeyError, match="loss/imag"):  # a name every rank does not know would misalign the reduce
        Meter(MODALITY_LOSSES).update(1.0, 1, {"loss/imag": 1.0})


def test_a_step_reports_each_micro_batch_loss_under_its_modality():
    from latentforge.training.batch import Batch
    from latentforge.training.config import TrainStageConfig
    from latentforge.training.dit import DiT, DiTConfig
    from latentforge.training.loop import build_accelerator, step_generator, train_step

    def batch(modality: int, latent: torch.Tensor) -> Batch:
        n = latent.shape[0]
        return Batch(latent=latent, text=torch.randn(n, 4, 8), text_mask=torch.ones(n, 4, dtype=torch.bool),
                     modality=torch.full((n,), modality), captions=["c"] * n)

    torch.manual_seed(0)
    model = DiT(DiTConfig(hidden=32, depth=1, heads=2, visual_channels=4, audio_channels=8, text_dim=8,
                          max_text_len=4))
    stage = TrainStageConfig(name="s", modalities=["image", "audio"], grad_accum=2, loader={"workers": 0})
    stream = iter([batch(0, torch.randn(3, 4, 1, 8, 8)), batch(2, torch.randn(2, 8, 6, 1, 1))])
    loss, seen, extra = train_step(build_accelerator(stage), model, stream, stage, step_generator(0, 0, 0), 2)
    assert seen == 5 and set(extra) == {"loss/image", "loss/audio"}
    assert len(extra["loss/image"]) == len(extra["loss/audio"]) == 1
    assert loss == pytest.approx((extra["loss/image"][0] + extra["loss/audio"][0]) / 2)  # the step's: their mean
    assert extra["loss/image"][0] != extra["loss/audio"][0]
    meter = Meter(MODALITY_LOSSES)
    meter.update(loss, seen, extra)
    assert set(meter.flush()) == {"loss", "samples_per_s", "loss/image", "loss/audio"}


def test_time_left_follows_the_pace_since_the_previous_report() -> None:
    now = [100.0]
    left = TimeLeft(total_steps=500, start_step=200, clock=lambda: now[0])  # a resumed stage: from step 200
    now[0] = 110.0
    assert left(210) == "4m50s left"  # 1 s a step, 290 to go
    now[0] = 115.0
    assert left(260) == "24s left"  # 0.1 s a step since the last report, 240 to go
    now[0] = 400.0
    assert left(500) == ""  # done


@pytest.mark.parametrize("seconds, text", [(0.4, "0s"), (42, "42s"), (59.6, "1m00s"), (185, "3m05s"),
                                           (7620, "2h07m")])
def test_duration(seconds: float, text: str) -> None:
    assert duration(seconds) == text
