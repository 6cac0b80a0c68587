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
FQN_FORMAT = "fqn"  # optimizer.pt's "optimizer_format" when the state is keyed by parameter name (FSDP)


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


def save_state_dicts(directory: Path, model_state: dict, ema_state: dict, optimizer_state: dict, scheduler,
                     state: dict, model_config: dict) -> None:
    """save_checkpoint from gathered state dicts (FSDP): the same files; the optimiser keyed by parameter name."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(model_state, str(directory / MODEL))
    save_file(ema_state, str(directory / EMA))
    (directory / "model_config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True))
    torch.save({"optimizer": optimizer_state, "optimizer_format": FQN_FORMAT, "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state()}, directory / OPTIMIZER)
    (directory / STATE).write_text(json.dumps(state, indent=2, sort_keys=True))


def read_optimizer(directory: Path, model: torch.nn.Module, by_name: bool) -> dict:
    """The saved optimiser state keyed by parameter name (`by_name`, for FSDP) or by index (plain torch)."""
    blob = torch.load(directory / OPTIMIZER, weights_only=True)
    state = blob["optimizer"]
    saved_by_name = blob.get("optimizer_format") == FQN_FORMAT
    if by_name and not saved_by_name:
        return index_to_fqn(state, model)
    if saved_by_name and not by_name:
        return fqn_to_index(state, model)
    return state


def index_to_fqn(state: dict, model: torch.nn.Module) -> dict:
    """torch's optimizer.state_dict() (parameters by index, in `model.parameters()` order) -> keyed by name."""
    names = [n for n, _ in model.named_parameters()]
    return {"state": {names[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}


def fqn_to_index(state: dict, model: torch.nn.Module) -> dict:
    """The inverse of `index_to_fqn`, for a DDP stage inheriting an FSDP stage's optimiser (inherit: full)."""
    index = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    return {"state": {index[n]: s for n, s in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}


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


def saved_model(directory: Path) -> torch.nn.Module:
    """The model a checkpoint was written from (its model_config.json), built on the meta device (no memory,
    no initialisation): its parameter names, in order, for an optimiser state saved by index."""
    from latentforge.training.dit import DiT, DiTConfig

    cfg = DiTConfig.from_dict(json.loads((directory / "model_config.json").read_text()))
    with torch.device("meta"):
        return DiT(cfg)


def inherited_optimizer_state(directory: Path, optimizer, model: torch.nn.Module) -> dict:
    """Another stage's optimiser moments (inherit: full), keyed by parameter name, under *this* stage's
    hyperparameters.

    torch's load_state_dict would also restore the saved param_groups: the previous stage's lr (its last
    value, so the first step skipped this stage's warm-up), betas and weight decay for the whole stage. Here
    the groups are this optimiser's own (with the lr its scheduler set). Moments are matched by name, so a
    parameter only one of the two stages has (REPA's projector) starts fresh or is dropped, where matching
    by index would fail on the count or pair moments with the wrong parameters."""
    blob = torch.load(directory / OPTIMIZER, weights_only=True)
    state = blob["optimizer"]
    if blob.get("optimizer_format") != FQN_FORMAT:
        state = index_to_fqn(state, saved_model(directory))  # its param_groups are replaced below
    name_of = {id(p): n for n, p in model.named_parameters()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [name_of[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    own = {n for g in groups for n in g["params"]}
    return {"state": {n: s for n, s in state["state"].items() if n in own}, "param_groups": groups}


def load_optimizer(directory: Path, optimizer, model: torch.nn.Module) -> None:
    """`inherited_optimizer_state` into a plain (unsharded) optimiser; its schedule is not carried over."""
    optimizer.load_state_dict(fqn_to_index(inherited_optimizer_state(directory, optimizer, model), model))


def load_checkpoint(directory: Path, model, ema, optimizer, scheduler) -> dict:
    """Restore everything a resumed stage needs; returns the saved state (step, ...)."""
    load_weights(directory, model, None, use_ema=False)
    ema.load_state_dict(load_file(str(directory / EMA)))
    blob = torch.load(directory / OPTIMIZER, weights_only=True)
    if optimizer is not None:  # None: the caller loads it after sharding (FSDP, see read_optimizer)
        optimizer.load_state_dict(read_optimizer(directory, model, by_name=False))
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    return json.loads((directory / STATE).read_text())
