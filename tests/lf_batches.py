"""Columnar batches as Ray Data hands them to a stage, for tests that call stages as plain callables."""
from __future__ import annotations

import numpy as np


def to_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """Row dicts -> a dict of numpy object arrays (one column per key of the first row)."""
    batch = {}
    for key in rows[0]:
        column = np.empty(len(rows), dtype=object)
        column[:] = [row[key] for row in rows]
        batch[key] = column
    return batch


def by_relpath(batch: dict[str, np.ndarray]) -> dict[str, dict]:
    return {batch["relpath"][i]: {k: v[i] for k, v in batch.items()} for i in range(len(batch["id"]))}
