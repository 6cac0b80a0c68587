"""Connecting to Ray: an existing cluster when an address is given, else a local one sized for the machine."""
from __future__ import annotations

import os

from latentforge.datasets.media import usable_cores
from latentforge.orchestration.config import RayConfig


def local_cpus(cfg: RayConfig) -> int:
    # Logical CPUs above the core count let Ray Data's actor pools and the train workers share a small machine.
    return cfg.num_cpus or max(4, 2 * usable_cores())


def connect_ray(cfg: RayConfig, *, log_to_driver: bool = True, address: str | None = None) -> dict:
    """`ray.init` once per process; returns what was connected to (for printing and tracking).

    Which cluster: `address` (the CLI's --address), else `ray.address`, else RAY_ADDRESS, else a new local one.
    """
    import ray

    if ray.is_initialized():
        return {"address": "already-connected", "cpus": ray.cluster_resources().get("CPU", 0)}
    address = address or cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        # address="local": always a new cluster. Without it ray.init joins whatever cluster `ray start` last
        # left on this machine (someone else's, on a shared host) and then refuses num_cpus.
        # Its GCS and raylet listen on every interface (Ray has no bind-address option); Ray's token
        # authentication, on by default, guards them. The dashboard stays off.
        ray.init(address="local", num_cpus=local_cpus(cfg), object_store_memory=cfg.object_store_mb * 2**20,
                 include_dashboard=False, log_to_driver=log_to_driver)
    return {"address": address or "local", "cpus": ray.cluster_resources().get("CPU", 0)}


def configure_ray_data() -> None:
    """Quieter, bounded Ray Data progress output for a terminal."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.print_on_execution_start = False
