"""`train_loop_per_worker` of one stage: accelerate inside Ray Train, rectified flow, EMA, checkpoints."""
from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from latentforge.datasets.encoders import decoders_from_card
from latentforge.datasets.manifest import Dataset
from latentforge.training import checkpoint as ckpt
from latentforge.training.config import TrainStageConfig
from latentforge.training.dit import DiT, DiTConfig
from latentforge.training.flow import flow_loss
from latentforge.training.loader import BucketedBatches, LatentNormalizer, load_rank_samples, open_datasets
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


def build_optimizer(model: torch.nn.Module, stage: TrainStageConfig):
    o = stage.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    warmup = max(1, o.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    return optimizer, scheduler


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """EMA with warm-up: early on the average follows the model closely, so a short stage's EMA is not
    dominated by its (zero-output) initial weights."""
    decay = min(decay, (1.0 + step) / (10.0 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)


def train_stage(config: dict) -> None:
    """Ray Train entry point: `TorchTrainer(train_stage, train_loop_config={"job": StageJob(...)})`."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    job: StageJob = config["job"]
    stage = job.stage
    # Modalities a batch does not use leave their parameters without gradients.
    acc = Accelerator(cpu=not torch.cuda.is_available(),
                      kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    rank, world = acc.process_index, acc.num_processes
    torch.manual_seed(job.seed + rank)
    datasets = open_datasets([Dataset(Path(d)) for d in job.datasets])
    normalizer = LatentNormalizer([d.card for d in datasets])
    batches = BucketedBatches(load_rank_samples(datasets, stage, rank, world), stage, normalizer, job.seed + rank)

    raw = DiT(DiTConfig.from_dict(job.model))
    ema = copy.deepcopy(raw).requires_grad_(False)
    optimizer, scheduler = build_optimizer(raw, stage)
    start = restore(raw, ema, optimizer, scheduler, job)
    model, optimizer = acc.prepare(raw, optimizer)
    sink = job.sink if acc.is_main_process else NullSink()
    generator = torch.Generator().manual_seed(job.seed * 7919 + rank)

    stream = iter(batches)
    for _ in range(start):  # the same batches an uninterrupted run would have consumed
        next(stream)
    window, t0, seen = [], time.perf_counter(), 0
    for step in range(start, stage.steps):
        batch = next(stream)
        batch = batch.to(acc.device)
        loss = flow_loss(model, batch.latent, batch.text, batch.text_mask, batch.modality, generator=generator,
                         cond_dropout=stage.cond_dropout)
        acc.backward(loss)
        grad_norm = acc.clip_grad_norm_(model.parameters(), stage.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(ema, raw, stage.ema_decay, step)
        window.append(loss.item())
        seen += batch.latent.shape[0]
        if (step + 1) % stage.log_every == 0 or step + 1 == stage.steps:
            elapsed = time.perf_counter() - t0
            metrics = {"loss": sum(window) / len(window), "lr": scheduler.get_last_lr()[0],
                       "grad_norm": float(grad_norm), "samples_per_s": seen * world / elapsed}
            sink.log_metrics(metrics, step + 1)
            if acc.is_main_process:
                print(f"[{stage.name}] step {step + 1}/{stage.steps} loss {metrics['loss']:.4f} "
                      f"({metrics['samples_per_s']:.0f} samples/s)", flush=True)
            window, t0, seen = [], time.perf_counter(), 0
        if (step + 1) % stage.checkpoint_every == 0 or step + 1 == stage.steps:
            report(acc, raw, ema, optimizer, scheduler, job, step + 1, loss.item())
    if acc.is_main_process and stage.num_samples:
        log_samples(ema, batches, normalizer, datasets[0].card, job, sink)


def restore(raw, ema, optimizer, scheduler, job: StageJob) -> int:
    """Resume this stage from its own last checkpoint, else start from the previous stage's weights."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            return int(ckpt.load_checkpoint(Path(d), raw, ema, optimizer, scheduler)["step"])
    if job.init_from and job.stage.inherit != "none":
        ckpt.load_weights(Path(job.init_from), raw, ema, use_ema=job.stage.inherit == "weights+ema")
    return 0


def report(acc, raw, ema, optimizer, scheduler, job: StageJob, step: int, loss: float) -> None:
    """Every worker reports (a barrier); rank 0 attaches the checkpoint."""
    import ray.train

    metrics = {"step": step, "loss": loss}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if acc.is_main_process:
            ckpt.save_checkpoint(Path(tmp), raw, ema, optimizer, scheduler, {"step": step, "stage": job.stage.name},
                                 job.model)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def log_samples(ema, batches: BucketedBatches, normalizer, card: dict, job: StageJob, sink) -> None:
    """Generate from a few of the stage's captions with the EMA weights; decode with the dataset's encoders."""
    stage = job.stage
    visual, audio = decoders_from_card(card)
    prompts = pick_prompts(batches.epoch(0), stage.num_samples)
    with tempfile.TemporaryDirectory() as tmp:
        files = write_samples(ema.eval(), prompts, normalizer, visual, audio, Path(tmp), steps=stage.sample_steps,
                              cfg_scale=stage.cfg_scale, seed=job.seed)
        for f in files:
            sink.log_artifact(f, "samples")
