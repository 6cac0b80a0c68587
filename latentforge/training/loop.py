"""`train_loop_per_worker` of one stage: accelerate inside Ray Train, rectified flow, EMA, checkpoints.

Resuming is exact: the data order is a function of (seed, epoch), every step draws its noise from a generator
seeded by (seed, rank, step), and a checkpoint holds model, EMA, optimiser, scheduler and the data position.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from latentforge.datasets.encoders import decoders_from_card
from latentforge.datasets.manifest import Dataset
from latentforge.training import checkpoint as ckpt
from latentforge.training import fsdp
from latentforge.training.config import TrainStageConfig
from latentforge.training.dit import DiT, DiTConfig
from latentforge.training.flow import flow_loss, flow_repa_loss, resolution_shift, validation_loss
from latentforge.training.loader import (
    LatentNormalizer,
    StreamPlan,
    build_stream,
    load_batches,
    open_datasets,
    rank_plan,
    repa_feature_dim,
    token_count,
)
from latentforge.training.metrics import MODALITY_LOSSES, Meter, TimeLeft, batch_modality, sum_over_ranks
from latentforge.training.sampling import pick_prompts, write_samples
from latentforge.training.sink import MetricSink, NullSink


@dataclass
class StageJob:
    """Everything a worker needs for one stage; built by the driver, shipped to every worker."""

    stage: TrainStageConfig
    model: dict
    datasets: list[str]
    seed: int = 0
    init_from: str | None = None
    sink: MetricSink = field(default_factory=NullSink)
    scratch: str | None = None  # a directory shared by the stage's attempts (fault-injection marker)


def stage_model(model: dict, stage: TrainStageConfig, datasets: list[Dataset]) -> dict:
    """The stage's DiTConfig: REPA's projector (depth from the stage, width from the datasets' cards) or none."""
    if stage.repa is None:
        return {**model, "repa_depth": 0, "repa_dim": 0}
    if stage.repa.depth > model["depth"]:
        raise ValueError(f"stage {stage.name!r}: repa.depth={stage.repa.depth} exceeds the model depth "
                         f"{model['depth']}")
    return {**model, "repa_depth": stage.repa.depth, "repa_dim": repa_feature_dim(datasets, stage)}


def build_optimizer(model: torch.nn.Module, stage: TrainStageConfig):
    o = stage.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    warmup = max(1, o.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    return optimizer, scheduler


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int, warmup: bool = True) -> None:
    """EMA with warm-up: early on the average follows the model closely, so a short stage's EMA is not
    dominated by its (zero-output) initial weights. No warm-up for an EMA a stage inherited (`ema_warmup`):
    it would replace the inherited average with the new stage's first weights within ~10 steps."""
    if warmup:
        decay = min(decay, (1.0 + step) / (10.0 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)


def carries_ema(job: StageJob) -> bool:
    """Whether the stage carries on the previous stage's EMA (weights+ema, full); with `weights` the EMA
    restarts from the loaded weights."""
    return bool(job.init_from) and job.stage.inherit in ("weights+ema", "full")


def ema_warmup(job: StageJob) -> bool:
    """Whether the stage's EMA starts with a warm-up: not when it carries on the previous stage's EMA."""
    return not carries_ema(job)


def step_generator(seed: int, rank: int, step: int, stage: str = "") -> torch.Generator:
    """The step's own random stream: no RNG state to save, the same draws after a resume. Seeded by a hash of
    (seed, stage, rank, step): a sum such as seed * P + rank * Q + step gives rank r + 1 at step s the stream
    of rank r at step s + Q, and every stage the same streams as the one before."""
    import zlib

    import numpy as np

    words = np.random.SeedSequence([seed, zlib.crc32(stage.encode()), rank, step]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))


def build_accelerator(stage: TrainStageConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if stage.fsdp.enabled:
        return fsdp.build_fsdp_accelerator(stage.fsdp, "bf16" if stage.precision == "bf16" else "no")
    # Modalities a batch does not use leave their parameters without gradients.
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="bf16" if stage.precision == "bf16" else "no",
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def batch_shift(stage: TrainStageConfig, batch, patch: int) -> float | None:
    if stage.timestep_shift == "auto":
        return resolution_shift(token_count(tuple(batch.latent.shape[1:]), patch))
    return stage.timestep_shift


def train_step(acc, model, stream, stage: TrainStageConfig, generator, patch: int) -> tuple[float, int, dict]:
    """One optimiser step over `grad_accum` micro-batches (gradients synchronised on the last one).

    Returns (loss, samples, extra metrics): each micro-batch's loss under `loss/MODALITY` (a list: micro-batches of
    one step can differ in modality), and with REPA `train/repa_loss` (the loss is then flow + weight * repa)."""
    total, seen, repa_total, extra = 0.0, 0, 0.0, {}
    for micro in range(stage.grad_accum):
        batch = next(stream)
        modality = batch_modality(batch)  # on the host copy: no device sync
        batch = batch.to(acc.device)
        sync = micro == stage.grad_accum - 1
        # The backward inside no_sync too: FSDP2 decides there whether to reduce-scatter (DDP at the forward).
        with contextlib.nullcontext() if sync else acc.no_sync(model):
            with acc.autocast():
                kwargs = {"generator": generator, "cond_dropout": stage.cond_dropout,
                          "timestep_shift": batch_shift(stage, batch, patch), "mask_ratio": stage.mask_ratio}
                if stage.repa is None:
                    loss = flow_loss(model, batch.latent, batch.text, batch.text_mask, batch.modality, **kwargs)
                else:
                    flow, repa = flow_repa_loss(model, batch.latent, batch.text, batch.text_mask, batch.modality,
                                                batch.repa, **kwargs)
                    loss = flow + stage.repa.weight * repa
                    repa_total += repa.item() / stage.grad_accum
            acc.backward(loss / stage.grad_accum)
        value = loss.item()
        total += value / stage.grad_accum
        seen += batch.latent.shape[0]
        if modality is not None:
            extra.setdefault(f"loss/{modality}", []).append(value)
    if stage.repa is not None:
        extra["train/repa_loss"] = repa_total
    return total, seen, extra


def train_stage(config: dict) -> None:
    """Ray Train entry point: `TorchTrainer(train_stage, train_loop_config={"job": StageJob(...)})`."""
    job: StageJob = config["job"]
    stage = job.stage
    acc = build_accelerator(stage)
    rank, world = acc.process_index, acc.num_processes
    torch.manual_seed(job.seed)  # the same initial weights on every rank
    model_cfg = DiTConfig.from_dict(job.model)
    datasets = open_datasets([Dataset(d) for d in job.datasets])
    normalizer = LatentNormalizer([d.card for d in datasets])
    batches = rank_plan(datasets, stage, normalizer, job.seed, world, patch=model_cfg.visual_patch,
                        repa=stage.repa is not None)  # the rank's stream plan: nothing is read yet
    raw = DiT(model_cfg)
    ema = copy.deepcopy(raw).requires_grad_(False)
    optimizer, scheduler = build_optimizer(raw, stage)
    if stage.compile:  # block by block, before DDP/FSDP wrap them (as torchtitan orders it); the EMA stays eager
        raw.compile_blocks()
    start, position, model, optimizer, ema = prepare(acc, raw, ema, optimizer, scheduler, job)
    sink = job.sink if acc.is_main_process else NullSink()
    sink.start()
    sharded = fsdp.is_sharded_run(acc)  # then every rank runs validation and gathers for samples (collectives)
    validation = validation_batches(datasets, stage, normalizer, job.seed, model_cfg.visual_patch,
                                    acc.is_main_process or sharded)
    stream = build_stream(batches, rank, position)  # what an uninterrupted run would see next
    meter = Meter(MODALITY_LOSSES + (("train/repa_loss",) if stage.repa is not None else ()))
    warmup = ema_warmup(job)
    left = TimeLeft(stage.steps, start)
    for step in range(start, stage.steps):
        maybe_fail(job, step + 1, acc.is_main_process)
        loss, seen, extra = train_step(acc, model, stream, stage, step_generator(job.seed, rank, step, stage.name),
                                       model_cfg.visual_patch)
        position += stage.grad_accum
        grad_norm = acc.clip_grad_norm_(model.parameters(), stage.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(ema, raw, stage.ema_decay, step, warmup)
        meter.update(loss, seen, extra)
        done = step + 1
        if done % stage.log_every == 0 or done == stage.steps:
            log_progress(sink, meter.flush(acc.device), scheduler, grad_norm, stage, done, acc.is_main_process,
                         left(done))
        if validation and (done == stage.steps or (stage.val_every and done % stage.val_every == 0)):
            sink.log_metrics(validate(raw, validation, stage, model_cfg.visual_patch, acc.device), done)
        if done % stage.checkpoint_every == 0 or done == stage.steps:
            report(acc, raw, ema, optimizer, scheduler, job, done, loss, position)
        if stage.num_samples and (done == stage.steps or (stage.sample_every and done % stage.sample_every == 0)):
            sampler = sampling_copy(acc, ema, model_cfg) if sharded else ema
            if acc.is_main_process:
                log_samples(sampler, batches, normalizer, datasets[0].card, job, sink,
                            "samples" if done == stage.steps else f"samples/step_{done:06d}")
    sink.close()


def validation_batches(datasets, stage: TrainStageConfig, normalizer, seed: int, patch: int, main: bool) -> list:
    """Rank 0's held-out batches (the same every time), or none."""
    if not (main and stage.val_fraction > 0):
        return []
    return load_batches(datasets, stage, normalizer, seed, split="val", limit=64, patch=patch)


@torch.no_grad()
def validate(raw, batches: list, stage: TrainStageConfig, patch: int, device) -> dict[str, float]:
    """Loss at fixed timesteps and a fixed noise seed, so values are comparable across steps."""
    raw.eval()
    totals: dict[float, float] = {}
    for batch in batches:
        batch = batch.to(device)
        losses = validation_loss(raw, batch.latent, batch.text, batch.text_mask, batch.modality)
        for t, value in losses.items():
            totals[t] = totals.get(t, 0.0) + value / len(batches)
    raw.train()
    out = {f"val_loss_t{t:.1f}": v for t, v in totals.items()}
    out["val_loss"] = sum(totals.values()) / max(1, len(totals))
    return out


def say(line: str) -> None:
    """One line to the worker's stdout, which Ray streams to the driver.

    Not `print`: Ray Train 2.60 replaces `print` in its workers with one that logs the line through the root
    logger and, because a Ray worker's sys.stdout is Ray's wrapper and not sys.__stdout__, also prints it,
    so every line reached the driver twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def log_progress(sink, metrics: dict, scheduler, grad_norm, stage: TrainStageConfig, step: int, main: bool,
                 left: str = "") -> None:
    metrics.update(lr=scheduler.get_last_lr()[0], grad_norm=fsdp.as_float(grad_norm))
    sink.log_metrics(metrics, step)
    if main:
        say(f"[{stage.name}] step {step}/{stage.steps} loss {metrics['loss']:.4f} "
            f"({metrics['samples_per_s']:.0f} samples/s{', ' + left if left else ''})")


def maybe_fail(job: StageJob, step: int, main: bool) -> None:
    """Chaos hook (`stage.fail_at_step`): the first attempt dies here; the marker makes retries pass."""
    if job.stage.fail_at_step != step or not main or not job.scratch:
        return
    marker = Path(job.scratch) / f"fault-injected-{job.stage.name}-{step}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    raise RuntimeError(f"injected failure at step {step} of stage {job.stage.name} (fail_at_step)")


def prepare(acc, raw, ema, optimizer, scheduler, job: StageJob):
    """Restore, then hand model and optimiser to accelerate: DDP, or FSDP2 sharding model and EMA alike.
    Returns (step, data position, model, optimizer, ema).

    Under FSDP the weights are loaded into the plain modules before sharding, the optimiser state after it
    (its moments must be sharded like the parameters they belong to).
    """
    if not job.stage.fsdp.enabled:
        resumed = restore(raw, ema, optimizer, scheduler, job, acc.num_processes)
        return (*resumed, *place(acc, raw, ema, optimizer))
    import ray.train

    if job.stage.fsdp.activation_checkpointing:
        raw.cfg = dataclasses.replace(raw.cfg, grad_checkpointing=True)
    raw.grad_all_families = True  # ranks whose batches differ in latent family still reduce the same gradients
    resumed = restore(raw, ema, None, scheduler, job, acc.num_processes)
    model, optimizer = acc.prepare(raw, optimizer)
    ema = fsdp.shard_like_model(acc, ema)
    fsdp.register_forward_methods(raw)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            fsdp.load_full_optimizer_state(raw, optimizer, ckpt.read_optimizer(Path(d), raw, by_name=True))
    elif job.init_from and job.stage.inherit == "full":
        fsdp.load_full_optimizer_state(raw, optimizer, ckpt.inherited_optimizer_state(Path(job.init_from), optimizer,
                                                                                      raw))
    return (*resumed, model, optimizer, ema)


def place(acc, raw, ema, optimizer):
    """DDP: model and optimiser handed to accelerate, which moves the model to its device; the EMA goes there
    too (its updates read the model's parameters). Returns (model, optimizer, ema)."""
    model, optimizer = acc.prepare(raw, optimizer)
    return model, optimizer, ema.to(acc.device)


def sampling_copy(acc, ema, model_cfg: DiTConfig):
    """Rank 0's unsharded copy of a sharded EMA for sampling (None elsewhere); every rank must call it."""
    state = fsdp.full_state(ema)
    if not acc.is_main_process:
        return None
    plain = DiT(model_cfg).requires_grad_(False)
    plain.load_state_dict(state)
    return plain.to(acc.device)


def restore(raw, ema, optimizer, scheduler, job: StageJob, world: int = 1) -> tuple[int, int]:
    """Resume this stage from its own last checkpoint, else start from the previous stage's final state.
    Returns (step, data position: batches this rank has consumed), (0, 0) for a fresh start.

    The saved position, not step * grad_accum: grad_accum may have changed since. Like a loader.workers change,
    a world size change still resumes, with a warning (refusing would strand the checkpoint): the position is
    rescaled so that the ranks together have consumed as many batches as before, i.e. the same share of the
    epoch, but the sample order is no longer the interrupted run's.
    optimizer None: its state is left for the caller (FSDP loads it after sharding)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = ckpt.load_checkpoint(Path(d), raw, ema, optimizer, scheduler)
        step = int(state["step"])
        position = int(state.get("data_position", step * job.stage.grad_accum))  # absent in older checkpoints
        saved = state.get("loader_workers", job.stage.loader.workers)
        if saved != job.stage.loader.workers:  # still resumes, but the data order is not the interrupted one's
            say(f"[{job.stage.name}] warning: checkpoint was written with loader.workers={saved}, resuming with "
                f"{job.stage.loader.workers}: the sample order from here differs from an uninterrupted run")
        saved = state.get("world_size", world)
        if saved != world:
            say(f"[{job.stage.name}] warning: checkpoint was written by {saved} workers, resuming with {world}: "
                f"each rank resumes at batch {position * saved // world} (was {position}), the same share of the "
                f"epoch, but the sample order from here differs from an uninterrupted run")
            position = position * saved // world
        return step, position
    inherit = job.stage.inherit
    if job.init_from and inherit != "none":
        carried = carries_ema(job)
        ckpt.load_weights(Path(job.init_from), raw, ema if carried else None, use_ema=inherit == "weights+ema")
        if not carried:
            ema.load_state_dict(raw.state_dict())
        if inherit == "full" and optimizer is not None:
            ckpt.load_optimizer(Path(job.init_from), optimizer, raw)
    return 0, 0


def report(acc, raw, ema, optimizer, scheduler, job: StageJob, step: int, loss: float, position: int) -> None:
    """Every worker reports (a barrier); rank 0 attaches the checkpoint."""
    import ray.train

    # The step's loss averaged over the ranks (a collective, like the report itself): Ray keeps rank 0's metrics
    # as the result's and logs every rank's, which then disagreed.
    metrics = {"step": step, "loss": sum_over_ranks([loss], acc.device)[0] / acc.num_processes}
    # data_position counts the batches every rank has consumed; with the seed, loader.workers and the world size
    # (readers = world x loader.workers) it fixes each reader's place in its epoch (see loader.LatentStream), so a
    # resumed run reads on mid-epoch.
    state = {"step": step, "stage": job.stage.name, "data_position": position,
             "loader_workers": job.stage.loader.workers, "world_size": acc.num_processes}
    sharded = fsdp.is_sharded_run(acc)
    if sharded:  # gathered to rank 0: collectives every rank joins
        gathered = fsdp.full_state(raw), fsdp.full_state(ema), fsdp.full_optimizer_state(raw, optimizer)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if acc.is_main_process and sharded:
            ckpt.save_state_dicts(Path(tmp), *gathered, scheduler, state, job.model)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        elif acc.is_main_process:
            ckpt.save_checkpoint(Path(tmp), raw, ema, optimizer, scheduler, state, job.model)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def log_samples(ema, batches: StreamPlan, normalizer, card: dict, job: StageJob, sink,
                artifact_path: str = "samples") -> None:
    """Generate from a few of the stage's captions, from every bucket in turn, with the EMA weights; decode with
    the dataset's encoders."""
    stage = job.stage
    visual, audio = decoders_from_card(card)
    patch = DiTConfig.from_dict(job.model).visual_patch
    prompts = pick_prompts(list(batches.prompt_plan(stage.num_samples).read_epoch(0, 0)), stage.num_samples)
    with tempfile.TemporaryDirectory() as tmp:
        files = write_samples(ema.eval(), prompts, normalizer, visual, audio, Path(tmp), steps=stage.sample_steps,
                              cfg_scale=stage.cfg_scale, seed=job.seed, method=stage.sampler,
                              shift=lambda prompt: batch_shift(stage, prompt, patch))
        for f in files:
            sink.log_artifact(f, artifact_path)
    ema.train()
