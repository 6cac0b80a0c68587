"""Typed configuration of a training plan: model, stages, optimiser; every model forbids unknown keys."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from latentforge.datasets.storage import Location

Modality = Literal["image", "video", "audio"]
MODALITY_IDS = {"image": 0, "video": 1, "audio": 2}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Strict):
    """Which DiT: a preset name from `DiT_models` plus field overrides of its `DiTConfig`."""

    preset: str = Field("DiT-T", description="a key of latentforge.training.dit.DiT_models")
    overrides: dict[str, Any] = Field(default_factory=dict, description="DiTConfig fields to override")

    @model_validator(mode="after")
    def _known(self) -> ModelConfig:
        from dataclasses import fields

        from latentforge.training.dit import DiT_archs, DiT_models, DiTConfig

        # each wrong key at its own path (training.model.overrides.KEY), as pydantic reports an unknown field
        known = sorted(f.name for f in fields(DiTConfig))
        problems = [{"type": PydanticCustomError("unknown_model_key", "unknown DiTConfig key; known: {known}",
                                                 {"known": ", ".join(known)}),
                     "loc": ("overrides", key), "input": value}
                    for key, value in self.overrides.items() if key not in known]
        if self.preset not in DiT_models:
            problems.insert(0, {"type": PydanticCustomError(
                "unknown_preset", f"unknown preset {self.preset!r}; choose from {sorted(DiT_models)}"),
                "loc": ("preset",), "input": self.preset})
        if problems:
            raise ValidationError.from_exception_data(type(self).__name__, problems)
        try:  # the preset's architecture with the overrides on top: exactly what build_dit will construct
            DiTConfig.from_dict({**DiT_archs[self.preset], **self.overrides})
        except TypeError as e:
            raise ValueError(f"model overrides {self.overrides}: {e}") from e
        return self


class OptimConfig(Strict):
    """AdamW with linear warm-up then constant learning rate."""

    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = Field(20, ge=0)
    grad_clip: float = Field(1.0, gt=0, description="max global grad norm")


class FSDPConfig(Strict):
    """FSDP2 (`fully_shard` per DiT block) through accelerate's plugin; off: DDP. For the large presets."""

    enabled: bool = Field(False, description="shard parameters, gradients and optimiser state across workers")
    reshard_after_forward: bool = Field(True, description=(
        "free each block's gathered weights after forward (ZeRO-3; less memory, one more all-gather in backward)"))
    cpu_offload: bool = Field(False, description="keep sharded parameters and optimiser state in host memory")
    activation_checkpointing: bool = Field(False, description="recompute each DiT block in backward")


class LoaderConfig(Strict):
    """How a stage's shards stream to each worker (see latentforge.training.loader)."""

    workers: int = Field(1, ge=0, description=(
        "DataLoader worker processes per training worker, each decoding its own shards; 0: a thread in the "
        "training process. Changing it changes the sample order (resume with the value the run started with)"))
    shuffle_buffer: int = Field(1000, ge=1, description="samples per reader mixed before bucketing (memory bound)")
    prefetch: int = Field(2, ge=1, description="batches each DataLoader worker prepares ahead")


class RepaConfig(Strict):
    """REPA: align the DiT's hidden states after block `depth` with the dataset's encoder features (repa.npy)."""

    weight: float = Field(0.5, gt=0, description="loss = flow + weight * repa (minus mean cosine similarity)")
    depth: int = Field(2, ge=1, description="DiT block whose output is projected (<= model depth)")


class TrainStageConfig(Strict):
    """One stage of the curriculum: its data selection, schedule and what it inherits."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    modalities: list[Modality] = Field(min_length=1, description="manifest modalities this stage trains on")
    video_frames_as_images: bool = Field(False, description="train on single random frames of the clips")
    mix: dict[Modality, float] | None = Field(None, description=(
        "each modality's share of an epoch's samples, e.g. {image: 0.6, video: 0.3, audio: 0.1} (normalised; "
        "every modality of the stage, none other): a modality's samples are repeated or subsampled, seeded per "
        "epoch, to reach it; default: the shares the selection has"))
    where: str | None = Field(None, description="manifest selection, e.g. \"score_caption_words >= 6\"")
    steps: int = Field(100, ge=1)
    batch_size: int = Field(16, ge=1, description="per worker (each bucket's, unless tokens_per_batch is set)")
    tokens_per_batch: int | None = Field(None, ge=1, description=(
        "per worker: each bucket's batch size is tokens_per_batch // tokens per sample, so small latents batch "
        "wider and tokens per step stay near constant"))
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimiser step")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 autocast (GPU, or CPU for tests)")
    compile: bool = Field(False, description="torch.compile each DiT block (one graph reused by every block)")
    timestep_shift: float | Literal["auto"] | None = Field(None, description=(
        "SD3 time shift: a number, 'auto' for sqrt(tokens / 256) per batch (larger latents get noisier t), or none"))
    mask_ratio: float = Field(0.0, ge=0, lt=1, description="deferred token masking: share of tokens dropped after "
                              "the patch mixer (set model.overrides.mixer_depth > 0)")
    sampler: Literal["euler", "heun"] = Field("euler", description="flow sampler for the stage's samples")
    val_fraction: float = Field(0.0, ge=0, lt=1, description=(
        "share of the selection held out (by sample id) for a validation loss at fixed timesteps"))
    val_every: int | None = Field(None, ge=1, description="validation every N steps (and at the end)")
    fail_at_step: int | None = Field(None, ge=1, description=(
        "chaos testing: the first attempt of this stage raises at this step (resume must make it invisible)"))
    optim: OptimConfig = OptimConfig()
    loader: LoaderConfig = LoaderConfig()
    repa: RepaConfig | None = Field(None, description=(
        "REPA alignment loss; needs a dataset whose card has encoders.repa (shards with repa.npy)"))
    fsdp: FSDPConfig = Field(FSDPConfig(), description="FSDP2 instead of DDP (see latentforge.training.fsdp)")
    ema_decay: float = Field(0.995, ge=0, lt=1)
    cond_dropout: float = Field(0.1, ge=0, le=1, description="caption dropout, for classifier-free guidance")
    inherit: Literal["none", "weights", "weights+ema", "full"] = Field(
        "weights+ema", description=(
            "what this stage takes from the previous stage's final checkpoint: weights (its EMA restarts from them), "
            "weights+ema (the model starts from the EMA weights, the EMA carries on), full (weights, EMA and "
            "optimiser moments; this stage's lr, betas, weight decay and warm-up apply)"))
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    num_samples: int = Field(4, ge=0, description="captions sampled at the end of the stage")
    sample_every: int | None = Field(None, ge=1, description="also sample every N steps (None: only at the end)")
    sample_steps: int = Field(20, ge=1)
    cfg_scale: float = Field(2.0, ge=0)

    @model_validator(mode="after")
    def _mix_covers_the_modalities(self) -> TrainStageConfig:
        if self.mix is not None:
            if set(self.mix) != set(self.modalities):
                raise ValueError(f"mix gives shares to {sorted(self.mix)}; it needs exactly the stage's modalities "
                                 f"{sorted(self.modalities)}")
            if any(share <= 0 for share in self.mix.values()):
                raise ValueError(f"mix shares must be > 0 (leave a modality out of `modalities` instead): {self.mix}")
        return self

    @field_validator("where")
    @classmethod
    def _parses(cls, where: str | None) -> str | None:
        if where is not None:
            from latentforge.datasets.manifest import MANIFEST_SCHEMA, parse_where

            parse_where(where, MANIFEST_SCHEMA)  # a typo in a column name fails at load, not mid-plan
        return where


class PlanConfig(Strict):
    """The stages run in order, each a Ray Train TorchTrainer.fit() starting from the previous one."""

    model: ModelConfig = ModelConfig()
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    seed: int = 0
    datasets: list[Location] = Field(default_factory=list, description=(
        "curated dataset dirs or URIs (s3://...) mixed in every stage (their encoders must match); "
        "default: the curation output"))
    max_failures: int = Field(2, ge=0, description="worker-group restarts before a stage fails")
    stages: list[TrainStageConfig] = Field(min_length=1)

    @field_validator("stages")
    @classmethod
    def _unique(cls, stages: list[TrainStageConfig]) -> list[TrainStageConfig]:
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        return stages
