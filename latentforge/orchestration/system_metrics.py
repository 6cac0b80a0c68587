"""CPU, memory, disk, network and GPU utilisation of a training run, as `system/...` metrics.

MLflow's own collectors (psutil; NVIDIA GPUs through nvidia-ml-py when it is installed and a GPU is present)
do the measuring. Its SystemMetricsMonitor loop is not used: it stops for good on the first failed request,
which an MLflow outage triggers; here the samples go through the run's outage-proof delivery queue instead.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("latentforge.tracking")


class SystemMetricsSampler:
    """A daemon thread that samples every `interval_s` seconds and logs through `log_metrics(metrics, step)`."""

    def __init__(self, uri: str, run_id: str, interval_s: float, log_metrics: Callable[[dict, int], None]):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # resume_logging: a resumed stage continues the system metrics' step count instead of restarting at 0
        self._monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True,
                                             tracking_uri=uri)
        self.interval_s, self._log = interval_s, log_metrics
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="latentforge-system-metrics")

    @property
    def step(self) -> int:
        return self._monitor._logging_step

    def start(self) -> None:
        self._thread.start()

    def sample(self) -> None:
        """Collect once and log the aggregate under `system/`."""
        self._monitor.collect_metrics()
        metrics = {f"system/{k}": float(v) for k, v in self._monitor.aggregate_metrics().items()}
        for monitor in self._monitor.monitors:
            monitor.clear_metrics()
        self._log(metrics, self._monitor._logging_step)
        self._monitor._logging_step += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception as e:  # a broken sensor must not end training
                log.warning("system metrics: sampling failed (%s); stopped", e)
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval_s + 5)
        try:
            self.sample()  # a last sample, so even a stage shorter than one interval has system metrics
        except Exception:
            pass
