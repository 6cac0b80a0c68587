"""Driver side of one stage: a Ray Train TorchTrainer whose run name makes it resumable."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from latentforge.datasets import storage
from latentforge.datasets.manifest import Dataset
from latentforge.training.config import PlanConfig, TrainStageConfig
from latentforge.training.dit import DiT_archs, DiTConfig
from latentforge.training.loader import open_datasets
from latentforge.training.loop import StageJob, stage_model, train_stage
from latentforge.training.sink import MetricSink, NullSink


@dataclass
class StageResult:
    name: str
    checkpoint_dir: Path  # local: a copy of the final checkpoint when Ray Train stored it at a URI
    metrics: dict
    checkpoint_uri: str | None = None  # where Ray Train stored it, when that is an object store


def model_config(plan: PlanConfig, card: dict) -> dict:
    """The resolved DiTConfig: the preset, shaped to the dataset's latents and text, then the plan's overrides."""
    enc = card["encoders"]
    fitted = {key: enc[family][field] for key, family, field in (
        ("visual_channels", "visual", "channels"), ("audio_channels", "audio", "channels"),
        ("text_dim", "text", "dim"), ("max_text_len", "text", "max_len")) if family in enc}
    return DiTConfig.from_dict({**DiT_archs[plan.model.preset], **fitted, **plan.model.overrides}).to_dict()


# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default) and sees a
# finished stage only at a poll: on one node a stage's workers were shut down 3.2 s after its last report, 0.9 s at
# 0.5 s (bench/fit_overhead.py). A poll is one small task per worker; a poll a busy worker does not answer in time
# is carried over to the next one, not counted as a failure (that takes 10 minutes of no answer). On a cluster of
# several nodes Ray's default stays: there a stage is long and its workers many.
POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
ONE_NODE_POLL_S = "0.5"


def controller_env(nodes: int) -> dict[str, str]:
    """Environment for the stage's Ray Train controller (Ray propagates these from the driver's own): the
    quicker poll on one node, unless the variable was set by the user."""
    return {POLL_ENV: ONE_NODE_POLL_S} if nodes == 1 and POLL_ENV not in os.environ else {}


@contextlib.contextmanager
def driver_env(values: dict[str, str]) -> Iterator[None]:
    """`values` in this process's environment for the block, then as they were. Only these keys are put back:
    unittest.mock.patch.dict would restore the whole environment, undoing what ray.init sets in it when fit()
    starts a local Ray."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def fit_stage(plan: PlanConfig, stage: TrainStageConfig, dataset_dirs: list[Path | str], storage_path: Path | str,
              run_name: str, init_from: Path | None = None, sink: MetricSink | None = None) -> StageResult:
    """Run (or resume: same `run_name` and `storage_path`) one stage with `TorchTrainer.fit()`.

    `storage_path` and `dataset_dirs` may be URIs (s3://...): Ray Train then writes checkpoints through a
    pyarrow filesystem with the configured endpoint, and workers get the storage settings in their env."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    datasets = open_datasets([Dataset(d) for d in dataset_dirs])  # refuses mixed encoders before any worker starts
    model = stage_model(model_config(plan, datasets[0].card), stage, datasets)  # REPA refused here, before workers
    job = StageJob(stage=stage, model=model, datasets=[str(d) for d in dataset_dirs],
                   seed=plan.seed, init_from=str(init_from) if init_from else None, sink=sink or NullSink(),
                   scratch=str(stage_scratch(storage_path, run_name)))
    ray_storage, filesystem = storage.train_storage(storage_path)
    worker_env = storage.ray_remote_args(storage_path, *dataset_dirs).get("runtime_env")
    trainer = stage_trainer_class()(
        train_stage,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=plan.num_workers, use_gpu=plan.use_gpu,
                                     resources_per_worker={"CPU": plan.cpus_per_worker}),
        run_config=RunConfig(
            name=run_name,
            storage_path=ray_storage,
            storage_filesystem=filesystem,
            worker_runtime_env=worker_env,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=plan.max_failures),
        ),
    )
    # not connected yet: fit() starts a local Ray, one node
    nodes = sum(1 for n in ray.nodes() if n.get("Alive")) if ray.is_initialized() else 1
    with driver_env(controller_env(nodes)):
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"stage {stage.name} finished without a checkpoint")
    if filesystem is None:
        return StageResult(name=stage.name, checkpoint_dir=Path(result.checkpoint.path), metrics=dict(result.metrics))
    # The next stage (init_from) and the weight export read files: keep a local copy of the final checkpoint.
    local = storage.cache_dir() / "checkpoints" / run_name / storage.name_of(result.checkpoint.path)
    result.checkpoint.to_directory(str(local))
    return StageResult(name=stage.name, checkpoint_dir=local, metrics=dict(result.metrics),
                       checkpoint_uri=storage.join(str(storage_path), run_name,
                                                   storage.name_of(result.checkpoint.path)))


def state_api_answers(timeout_s: int = 5) -> bool:
    """Whether Ray's State API (served by the cluster's dashboard) answers for *this* cluster.

    The local head runs no dashboard, yet Ray still records the default 127.0.0.1:8265 as its State API
    address. Where another cluster's dashboard holds that port (a colleague's Ray on a shared host), the
    State API answers, about that cluster: asked for our train controller, it finds no such actor, and Ray's
    placement-group cleaner would take the controller for dead and remove our workers' placement group in
    the middle of the stage. So the answer only counts when it knows the node this driver runs on.
    """
    import ray
    from ray.util.state import list_nodes
    from ray.util.state.exception import RayStateApiException

    context = ray.get_runtime_context()
    try:
        # The address named: left out, Ray looks for "the" local cluster and refuses when it finds several.
        nodes = list_nodes(address=context.gcs_address, filters=[("node_id", "=", context.get_node_id())],
                           limit=1, timeout=timeout_s, raise_on_missing_output=False)
    except (RayStateApiException, ConnectionError, ValueError):  # ValueError: no API address in the GCS
        return False
    return len(nodes) == 1


def stage_trainer_class() -> type:
    """TorchTrainer, without Ray Train's placement-group cleaner where the State API does not answer for
    this cluster (`state_api_answers`).

    The cleaner is a detached actor that asks the State API once a second whether the train controller still
    lives, to remove the workers' placement group if it died without cleaning up. With no dashboard every ask
    fails: it logged a warning per second for the whole stage (over half of the quickstart's output), could
    never see the controller die, and, being detached, outlived an ungraceful exit polling forever. Ray has no
    switch for it, so this drops it from the trainer's default callbacks (a private hook, hence the fallback
    to the plain TorchTrainer). On a local head the placement groups go with the cluster when the driver exits.
    """
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:
        return TorchTrainer
    if not hasattr(TorchTrainer, "_create_default_callbacks") or state_api_answers():
        return TorchTrainer

    class StageTrainer(TorchTrainer):
        def _create_default_callbacks(self) -> list:
            callbacks = super()._create_default_callbacks()
            return [cb for cb in callbacks if not isinstance(cb, PlacementGroupCleanerCallback)]

    return StageTrainer


def stage_scratch(storage_path: Path | str, run_name: str) -> Path:
    """A local directory shared by a stage's attempts (an object store cannot hold its marker files)."""
    if storage.is_remote(storage_path):
        return storage.scratch_dir() / "runs" / run_name
    return Path(storage_path).resolve() / run_name / "scratch"
