"""Checkpoints as a directory: weights as safetensors, optimiser / RNG state loaded with weights_only=True."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MODEL = "model.safetensors"
EMA = "ema.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_weights(directory: Path, model: torch.nn.Module, ema: torch.nn.Module, model_config: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(_cpu_state(model), str(directory / MODEL))
    save_file(_cpu_state(ema), str(directory / EMA))
    (directory / "model_config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True))


def save_checkpoint(directory: Path, model, ema, optimizer, scheduler, state: dict, model_config: dict) -> None:
    save_weights(directory, model, ema, model_config)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state()}, directory / OPTIMIZER)
    (directory / STATE).write_text(json.dumps(state, indent=2, sort_keys=True))


def load_weights(directory: Path, model: torch.nn.Module, ema: torch.nn.Module | None, use_ema: bool) -> None:
    """Load the model (and EMA) weights; with `use_ema` the model starts from the EMA weights too."""
    ema_state = load_file(str(directory / EMA))
    model.load_state_dict(fit_repa(ema_state if use_ema else load_file(str(directory / MODEL)), model))
    if ema is not None:
        ema.load_state_dict(fit_repa(ema_state, ema))


def fit_repa(state: dict, module: torch.nn.Module) -> dict:
    """A state across a REPA boundary: the projector exists only while a stage trains with REPA, so a stage
    without it drops the saved projector and a stage starting REPA keeps its freshly initialised one."""
    own = module.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith("repa_projector.")}
    return state | {k: v for k, v in own.items() if k.startswith("repa_projector.") and k not in state}


def load_optimizer(directory: Path, optimizer) -> None:
    """Optimiser moments from another stage's checkpoint (inherit: full); its schedule is not carried over."""
    optimizer.load_state_dict(torch.load(directory / OPTIMIZER, weights_only=True)["optimizer"])


def load_checkpoint(directory: Path, model, ema, optimizer, scheduler) -> dict:
    """Restore everything a resumed stage needs; returns the saved state (step, ...)."""
    load_weights(directory, model, None, use_ema=False)
    ema.load_state_dict(load_file(str(directory / EMA)))
    blob = torch.load(directory / OPTIMIZER, weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    return json.loads((directory / STATE).read_text())
