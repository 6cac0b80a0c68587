"""Suite-wide options.

- `LF_SKIP_SLOW=1` skips tests marked `slow` (each over a minute on 2 cores): a quick local run.
- `LF_SKIP_HEAVY=1` skips only tests marked `heavy`: end-to-end runs whose parts are already covered by
  faster tests (.ci/run sets it to keep CI near 15 minutes; `bash scripts/test.sh` runs them).
"""
from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config, items):
    for marker, var in (("slow", "LF_SKIP_SLOW"), ("heavy", "LF_SKIP_HEAVY")):
        if os.environ.get(var) != "1":
            continue
        skip = pytest.mark.skip(reason=f"{var}=1")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)
