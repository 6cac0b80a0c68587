"""Each training step's random stream (noise, times, caption dropout, token masking) is its own: the same
after a resume, and different for every (seed, stage, rank, step)."""
from __future__ import annotations

import torch

from latentforge.training.loop import step_generator


def draws(*key) -> torch.Tensor:
    return torch.rand(4, generator=step_generator(*key))


def test_the_stream_is_a_function_of_seed_stage_rank_and_step() -> None:
    assert torch.equal(draws(0, 1, 5, "video"), draws(0, 1, 5, "video"))  # what a resumed step draws again
    others = [(1, 1, 5, "video"), (0, 0, 5, "video"), (0, 1, 6, "video"), (0, 1, 5, "image")]
    assert all(not torch.equal(draws(0, 1, 5, "video"), draws(*k)) for k in others)


def test_no_rank_replays_another_ranks_steps() -> None:
    """A seed summed from its parts (seed * P + rank * 7919 + step) gave rank 1 at step 0 the stream of rank 0
    at step 7919, and each stage the streams of the one before."""
    assert not torch.equal(draws(0, 1, 0), draws(0, 0, 7919))
    assert not torch.equal(draws(0, 0, 3, "pretrain"), draws(0, 0, 3, "finetune"))
