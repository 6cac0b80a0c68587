"""The logged training metrics are the run's, not rank 0's: means over every rank's steps (a real two-process
gloo group), as the loop logs them and reports them to Ray Train."""
from __future__ import annotations

import itertools
import multiprocessing

import pytest
import torch

from latentforge.training.loop import Meter, sum_over_ranks

# Per rank: the losses of its steps in one logging window, its samples per step, its REPA losses.
LOSSES = {0: [1.0, 3.0], 1: [5.0, 9.0]}
SEEN = {0: 4, 1: 2}
REPA = {0: [-0.2, -0.4], 1: [-0.6, -0.8]}


def one_rank(rank: int, init: str, out) -> None:
    import torch.distributed as dist

    from latentforge.training import loop

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    clock = itertools.chain([100.0], itertools.repeat(102.0))  # the window starts, and flushes 2 s later
    loop.time = type("Clock", (), {"perf_counter": staticmethod(lambda: next(clock))})
    try:
        meter = Meter()
        for loss, repa in zip(LOSSES[rank], REPA[rank]):
            meter.update(loss, SEEN[rank], {"train/repa_loss": repa})
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
