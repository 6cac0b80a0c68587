"""Suite-wide options: LF_SKIP_SLOW=1 skips tests marked `slow`."""
from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config, items):
    if os.environ.get("LF_SKIP_SLOW") != "1":
        return
    skip = pytest.mark.skip(reason="LF_SKIP_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
