"""How big a local Ray and its CPU pools are: the cores this process may run on, not the machine's."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from latentforge.datasets.media import usable_cores


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2, reason="needs Linux, 2+ cores")
def test_pools_are_sized_to_the_cores_this_process_may_use_not_the_machines() -> None:
    """Under taskset, a container's cpuset or a scheduler's allocation, os.cpu_count() still counts every core
    of the machine; a local Ray and its CPU pools are sized to the cores the process may run on."""
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "from latentforge.datasets.media import usable_cores\n"
        "from latentforge.orchestration.cluster import local_cpus\n"
        "from latentforge.orchestration.config import RayConfig\n"
        "from latentforge.pipelines.curate import pool_cpus\n"
        "print(os.cpu_count(), usable_cores(), local_cpus(RayConfig()), pool_cpus(8, local=True), "
        "pool_cpus(8, local=False))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    machine, usable, ray_cpus, local_pool, cluster_pool = (float(v) for v in out)
    assert machine >= 2 and usable == 1
    assert ray_cpus == 4  # max(4, 2 x one core): the local Ray's floor
    assert (local_pool, cluster_pool) == (1, 8)
    assert usable_cores() == len(os.sched_getaffinity(0))
