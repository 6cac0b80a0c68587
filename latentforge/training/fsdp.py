"""FSDP2 (per-block `fully_shard`) through accelerate's plugin, and what sharding changes around the loop.

accelerate does the sharding: `FullyShardedDataParallelPlugin(fsdp_version=2)` handed to `Accelerator` makes
`prepare` call `fully_shard` on every DiT block, then on the root. What this module adds:
- CPU/gloo: accelerate 1.15 keeps `MULTI_CPU` (plain DDP) when there is no GPU and ignores the plugin
  (state.py only switches to FSDP for the GPU-class distributed types), although torch's `fully_shard` runs on
  CPU with gloo. `build_fsdp_accelerator` switches the state to FSDP there, so CPU tests run the very same
  accelerate code path a GPU run takes.
- EMA: sharded exactly like the model (same wrap policy, same mesh), so the update is a local lerp of shards.
- Checkpoints: full state dicts gathered to rank 0 and written in the DDP layout (safetensors + optimizer.pt),
  so a checkpoint does not care which strategy wrote it: resume, `inherit`, sampling and the model registry
  read the same files. The optimizer is stored keyed by parameter name (`optimizer_format: "fqn"`); the DDP
  layout (keyed by parameter index) is converted on load, in both directions.
"""
from __future__ import annotations

import torch
from torch import nn

from latentforge.training.config import FSDPConfig

BLOCK_CLASS = "DiTBlock"  # one FSDP unit per DiT block (mixer and backbone); the rest lives in the root unit


def build_fsdp_plugin(cfg: FSDPConfig):
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=[BLOCK_CLASS],
        reshard_after_forward=cfg.reshard_after_forward,
        cpu_offload=cfg.cpu_offload,
        state_dict_type="FULL_STATE_DICT",
        # Our blocks already checkpoint themselves (DiTConfig.grad_checkpointing, non-reentrant, which FSDP2
        # supports); accelerate's wrapper would wrap them a second time.
        activation_checkpointing=False,
        cpu_ram_efficient_loading=False,  # every rank builds the same seeded weights; no rank-0 broadcast needed
    )


def build_fsdp_accelerator(cfg: FSDPConfig, mixed_precision: str):
    """An Accelerator on the FSDP2 path, also without a GPU (see the module docstring)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    plugin = build_fsdp_plugin(cfg)
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision, fsdp_plugin=plugin)
    if acc.distributed_type == DistributedType.MULTI_CPU:
        from accelerate.state import PartialState

        # What AcceleratorState.__init__ does on a GPU (state.py): every later AcceleratorState() re-reads
        # PartialState's shared dict, so the switch must be made there too.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = plugin
        if mixed_precision != "no":
            plugin.set_mixed_precision(mixed_precision)
    if acc.distributed_type != DistributedType.FSDP and acc.num_processes > 1:
        raise RuntimeError(f"fsdp.enabled but accelerate chose {acc.distributed_type}")
    return acc


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(getattr(module, "_orig_mod", module), FSDPModule)


def shard_like_model(acc, ema: nn.Module) -> nn.Module:
    """Shard the EMA copy with the model's plugin and mesh: its shards line up with the model's one for one."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    if not is_sharded_run(acc):
        return ema
    return fsdp2_prepare_model(acc, ema)


# Methods called on the model from outside `forward`: `null_text` (caption dropout reads the learned null
# caption before the forward pass) and REPA's `forward_with_features`.
FORWARD_METHODS = ("null_text", "forward_with_features")


def register_forward_methods(module: nn.Module) -> None:
    """FSDP2 gathers parameters around `forward` only; make the other entry points gather too.

    `null_text` touches only root-unit parameters; the root is not resharded after forward, and its gradients
    are reduce-scattered once at the end of backward, so the null caption's gradient is averaged like any other.
    """
    from torch.distributed.fsdp import register_fsdp_forward_method

    for name in FORWARD_METHODS:
        if is_sharded(module) and hasattr(module, name):
            register_fsdp_forward_method(module, name)


def is_sharded_run(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on rank 0 (CPU), {} elsewhere; a collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def full_optimizer_state(model: nn.Module, optimizer) -> dict:
    """Optimiser state keyed by parameter name, whole, on rank 0 ({} elsewhere); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    """Shard a whole name-keyed optimiser state (read by every rank) onto this rank's parameters."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # strict=False: a parameter that never had a gradient (the audio head in an image stage) has no AdamW state,
    # in the checkpoint as in a plain optimizer, and keeps none here.
    set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), state,
                             options=StateDictOptions(full_state_dict=True, strict=False))


def as_float(value) -> float:
    """clip_grad_norm_ returns a replicated DTensor under FSDP2."""
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)
