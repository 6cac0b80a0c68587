"""A background thread that collates a loader's next batches while the current training step runs."""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

from latentforge.training.batch import Batch

_END = object()


class Prefetcher:
    """Collates the next batches in a background thread while the current step runs.

    numpy stacking and torch.from_numpy release the GIL for the copies that matter, so on a worker with a
    spare core the loader's cost leaves the step's critical path. Order is preserved. The training stream is
    endless, but a finite iterator ends the prefetcher too, rather than leaving its consumer waiting.
    """

    def __init__(self, iterator: Iterator[Batch], depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._fill, args=(iterator,), daemon=True)
        self._thread.start()

    def _fill(self, iterator: Iterator[Batch]) -> None:
        try:
            for item in iterator:
                self._queue.put(item)
            self._queue.put(_END)
        except BaseException as e:  # surfaced in the consumer, not lost in the thread
            self._queue.put(e)

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Batch:
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)  # every later call ends too
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item
