"""`latentforge submit`: run a latentforge command on a remote Ray cluster as a Ray Job.

Ray's Jobs API already does what this needs (upload the working directory, run an entrypoint on the head, keep
its logs, report its status), so this is a thin typed front over `JobSubmissionClient`, not a job runner.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Commands that make sense as a job: each runs on the cluster the job lands on (RAY_ADDRESS is set for it).
JOB_COMMANDS = ("run", "curate", "train", "validate")
# Forwarded to the job when set here, so the job logs to the same MLflow server as the submitter sees.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "MLFLOW_TRACKING_TOKEN", "MLFLOW_EXPERIMENT_NAME")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass(frozen=True)
class JobSpec:
    """What to run: `latentforge COMMAND CONFIG [--set ...]` inside a runtime env."""

    config: str
    command: str = "run"
    overrides: tuple[str, ...] = ()
    working_dir: Path | None = None
    pip: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)

    def entrypoint(self) -> str:
        if self.command not in JOB_COMMANDS:
            raise ValueError(f"command {self.command!r} cannot run as a job; choose one of {JOB_COMMANDS}")
        args = ["latentforge", self.command, self.config]
        for o in self.overrides:
            args += ["--set", o]
        return shlex.join(args)

    def runtime_env(self) -> dict:
        env: dict = {"env_vars": dict(self.env)}
        if self.working_dir is not None:
            env["working_dir"] = str(self.working_dir)
        if self.pip:
            env["pip"] = list(self.pip)
        return env


def job_config_path(config: Path, working_dir: Path | None) -> str:
    """The config as the job sees it: relative to the uploaded working dir when it lies inside it; otherwise the
    absolute path, which must then exist on the head node too (a shared filesystem or the image)."""
    config = config.resolve()
    if working_dir is not None:
        with contextlib.suppress(ValueError):
            return config.relative_to(working_dir.resolve()).as_posix()
    return str(config)


def forwarded_env(extra: list[str] | None, environ: dict[str, str] = os.environ) -> dict[str, str]:
    """MLflow settings of the submitting shell, then `--env KEY=VALUE` pairs (these win)."""
    env = {k: environ[k] for k in FORWARDED_ENV if environ.get(k)}
    for pair in extra or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--env {pair!r} must look like KEY=VALUE")
        env[key] = value
    return env


@contextlib.contextmanager
def _explicit_address(address: str | None) -> Iterator[None]:
    # Ray lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the client's `address` argument; an address the
    # user typed on the command line should win over whatever the shell happens to export.
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if address and k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def job_client(address: str | None):
    """A JobSubmissionClient for `address`, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS, else the local default."""
    from ray.job_submission import JobSubmissionClient

    if not address and not (os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")):
        address = DEFAULT_ADDRESS
    with _explicit_address(address):
        return JobSubmissionClient(address)


def submit_job(client, spec: JobSpec, agent_wait_s: float = 60.0) -> str:
    """Submit; while a freshly started head's job agent is not up yet (the Jobs API answers 500 "No available
    agent to submit job"), retry for up to `agent_wait_s` instead of failing the user's submission."""
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            return client.submit_job(entrypoint=spec.entrypoint(), runtime_env=spec.runtime_env(),
                                     metadata={"latentforge": spec.command})
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def follow(client, job_id: str, write: Callable[[str], object]) -> str:
    """Stream the job's logs until it ends (Ray closes the stream then); returns its final status."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    asyncio.run(tail())
    status = str(client.get_job_status(job_id).value)
    # The log stream can close a moment before the status turns terminal.
    for _ in range(60):
        if status in TERMINAL:
            break
        time.sleep(1.0)
        status = str(client.get_job_status(job_id).value)
    return status
