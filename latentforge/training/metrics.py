"""Training metrics as the run's, not one rank's: a logging window's means over every step of every rank, and
each batch's loss under its modality."""
from __future__ import annotations

import time

import torch

from latentforge.training.config import MODALITY_IDS

MODALITY_NAMES = {i: name for name, i in MODALITY_IDS.items()}
# Logged beside `loss`: one family's loss can sit still while the mean falls (the quickstart's audio, a few dozen
# finetune batches among images and videos, stays near the loss of predicting zero while images learn).
MODALITY_LOSSES = tuple(f"loss/{name}" for name in MODALITY_IDS)


def batch_modality(batch) -> str | None:
    """The one modality of a batch (buckets hold one latent shape, so one modality in practice), else None."""
    ids = batch.modality.unique()
    return MODALITY_NAMES[int(ids[0])] if len(ids) == 1 else None


def sum_over_ranks(values: list[float], device) -> list[float]:
    """Element-wise sums over every rank of the process group (one all_reduce); the values as they are outside
    one. Every rank must call it at the same point: it is a collective."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    summed = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(summed)
    return summed.tolist()


class Meter:
    """Loss / throughput over a logging window, over all ranks: ranks read different buckets and modalities,
    so one rank's loss is a noisy, biased sample of the run's (DiT's and torchtitan's loops all-reduce it too).

    `extras` names the other metrics, declared up front: the all-reduce needs the same vector on every rank,
    whichever modalities each happened to read."""

    def __init__(self, extras: tuple[str, ...] = ()):
        self.names = tuple(sorted(extras))
        self.losses, self.seen, self.t0 = [], 0, time.perf_counter()
        self.extra: dict[str, list[float]] = {name: [] for name in self.names}

    def update(self, loss: float, seen: int, extra: dict[str, float | list[float]] | None = None) -> None:
        """One step: its loss, its samples, and values of the declared extras (a list adds several)."""
        self.losses.append(loss)
        self.seen += seen
        for name, value in (extra or {}).items():
            if name not in self.extra:
                raise KeyError(f"metric {name!r} was not declared to the Meter ({', '.join(self.names)})")
            self.extra[name].extend(value if isinstance(value, list) else [value])

    def flush(self, device=None) -> dict[str, float]:
        """Means over every value of the window on every rank (an extra no rank saw is left out), and samples/s
        of all ranks together. A collective where a process group is up: every rank flushes at the same steps."""
        names = self.names
        totals = sum_over_ranks([sum(self.losses), len(self.losses), self.seen,
                                 *(sum(self.extra[n]) for n in names), *(len(self.extra[n]) for n in names)], device)
        loss, steps, seen = totals[:3]
        sums, counts = totals[3:3 + len(names)], totals[3 + len(names):]
        out = {"loss": loss / steps, "samples_per_s": seen / (time.perf_counter() - self.t0),
               **{name: total / count for name, total, count in zip(names, sums, counts) if count}}
        self.__init__(names)
        return out


class TimeLeft:
    """A stage's time left, from the pace of its steps since the previous report (validation, checkpoints and
    samples in between included, as they will be again): "4m05s left" on the step lines of a long stage."""

    def __init__(self, total_steps: int, start_step: int, clock=time.perf_counter):
        self.total, self.clock = total_steps, clock
        self.last = (clock(), start_step)

    def __call__(self, step: int) -> str:
        now, (then, before) = self.clock(), self.last
        self.last = (now, step)
        if step <= before or step >= self.total:
            return ""
        return f"{duration((now - then) / (step - before) * (self.total - step))} left"


def duration(seconds: float) -> str:
    """42s, 3m05s, 2h07m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
