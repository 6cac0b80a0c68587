"""The stage controller's poll interval: quicker on one node, Ray's own on a cluster, the user's when set."""
from __future__ import annotations

import os

import pytest

from latentforge.training.trainer import ONE_NODE_POLL_S, POLL_ENV, controller_env, driver_env


def test_one_node_polls_quicker_a_cluster_keeps_rays_default(monkeypatch) -> None:
    monkeypatch.delenv(POLL_ENV, raising=False)
    assert controller_env(1) == {POLL_ENV: ONE_NODE_POLL_S}
    assert controller_env(3) == {}
    monkeypatch.setenv(POLL_ENV, "5")  # the user's choice is kept, on one node too
    assert controller_env(1) == {}


def test_the_driver_env_is_as_before_after_the_block_even_when_it_raises(monkeypatch) -> None:
    monkeypatch.delenv(POLL_ENV, raising=False)
    monkeypatch.setenv("LF_TEST_KEPT", "before")
    with pytest.raises(RuntimeError), driver_env({POLL_ENV: "0.5", "LF_TEST_KEPT": "during"}):
        assert (os.environ[POLL_ENV], os.environ["LF_TEST_KEPT"]) == ("0.5", "during")
        raise RuntimeError("a failed fit")
    assert POLL_ENV not in os.environ and os.environ["LF_TEST_KEPT"] == "before"
