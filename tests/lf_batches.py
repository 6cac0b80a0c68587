"""Columnar batches as Ray Data hands them to a stage, for tests that call stages as plain callables."""
from __future__ import annotations

import numpy as np

from latentforge.pipelines.stage import batch_of as to_batch  # noqa: F401  (the tests' name for it)


def by_relpath(batch: dict[str, np.ndarray]) -> dict[str, dict]:
    return {batch["relpath"][i]: {k: v[i] for k, v in batch.items()} for i in range(len(batch["id"]))}
