"""The loader's background prefetch: order kept, a failure in the producer raised in the consumer."""
from __future__ import annotations

import pytest

from latentforge.training.prefetch import Prefetcher


def test_items_come_in_order_then_stop() -> None:
    assert list(Prefetcher(iter(range(50)), depth=3)) == list(range(50))


def test_a_producer_error_reaches_the_consumer_after_the_items_before_it() -> None:
    def produce():
        yield 1
        yield 2
        raise ValueError("shard 7 is truncated")

    got = []
    with pytest.raises(ValueError, match="shard 7 is truncated"):
        for item in Prefetcher(produce()):
            got.append(item)
    assert got == [1, 2]
