"""What a stage asks Ray Data for, and the strict base of every pipeline config (no other imports here, so
stage modules can declare their own configs without import cycles)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StageResources(Strict):
    """What one stage asks Ray Data for: mapped one-to-one onto `map_batches` keywords."""

    num_cpus: float = Field(0.5, gt=0, description="CPUs per actor (fractional is fine)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor")
    batch_size: int = Field(8, ge=1, description="rows per batch handed to the stage")
    pool: int = Field(1, ge=1, description="actors in the stage's pool")
