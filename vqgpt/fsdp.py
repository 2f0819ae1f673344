"""FSDP2 for the GPT (`--fsdp`): parameters, gradients and optimizer state sharded over the ranks.

Each transformer block is sharded, then the whole model (embeddings, final norm, head), so a rank keeps 1/N
of everything and gathers one block at a time to run it. Checkpoints stay the full state dicts a DDP or
one-process run writes (model keys as `state_dict()`, optimizer state id-keyed as `Optimizer.state_dict()`),
gathered to rank 0, so any world size, with or without --fsdp, resumes any checkpoint.
"""
from __future__ import annotations

import sys

import torch

# torch.distributed's FSDP and state-dict modules are imported where used: loading them costs every script ~1 s


def state_dict_options(gather_to_main: bool):
    """Full state dicts: gathered to rank 0 (on the CPU; {} on the others), or given whole to every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=gather_to_main)


def shard_gpt(model: torch.nn.Module) -> torch.nn.Module:
    """Shard every block, then the rest; build the optimizer after this (the parameters are replaced)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def is_sharded(module: torch.nn.Module) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")   # not loaded: nothing was sharded
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


def is_dtensor(tensor: torch.Tensor) -> bool:
    tensor_module = sys.modules.get("torch.distributed.tensor")
    return tensor_module is not None and isinstance(tensor, tensor_module.DTensor)


def replicated_value(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a (replicated) DTensor result such as clip_grad_norm_'s total norm."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def local_shards(tensors) -> list[torch.Tensor]:
    """This rank's shards of sharded parameters (the same storage), plain tensors as they are."""
    return [t.to_local() if is_dtensor(t) else t for t in tensors]


class FullStateModel:
    """A sharded model as the checkpoint sees it. state_dict: every rank calls it, rank 0 gets the full state
    (on the CPU), the others {}. load_state_dict: every rank passes the full state and keeps its shard."""

    def __init__(self, model: torch.nn.Module):
        self.module = model

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.module, options=state_dict_options(gather_to_main=True))

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.module, state, options=state_dict_options(gather_to_main=False))


class FullStateOptimizer:
    """The optimizer of a sharded model in torch's standard id-keyed format (ids numbered over the parameter
    groups in order, as Optimizer.state_dict() numbers them), converted from and to the parameter-name keys
    get/set_optimizer_state_dict use. state_dict is collective like FullStateModel's."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        names = {param: name for name, param in model.named_parameters()}   # a tied weight: its first name
        self.names = [names[param] for group in optimizer.param_groups for param in group["params"]]

    @property
    def param_groups(self) -> list[dict]:   # with_hyperparameters merges this run's settings into a saved state
        return self.optimizer.param_groups

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        named = get_optimizer_state_dict(self.model, self.optimizer, options=state_dict_options(gather_to_main=True))
        if not named:
            return {}
        ids = {name: index for index, name in enumerate(self.names)}
        return {"state": {ids[name]: state for name, state in named["state"].items()},
                "param_groups": [{**group, "params": [ids[name] for name in group["params"]]}
                                 for group in named["param_groups"]]}

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        groups = state["param_groups"]
        if [len(group["params"]) for group in groups] != [len(group["params"]) for group in self.param_groups]:
            raise ValueError("its parameter groups do not match this model's")
        named = {"state": {self.names[index]: value for index, value in state["state"].items()},
                 "param_groups": [{**group, "params": [self.names[index] for index in group["params"]]}
                                  for group in groups]}
        set_optimizer_state_dict(self.model, self.optimizer, named, options=state_dict_options(gather_to_main=False))


@torch.no_grad()
def sharded_copy(model: torch.nn.Module, make: callable) -> torch.nn.Module:
    """Another `make()`, sharded like the sharded `model` and holding its weights, shard for shard (the weight EMA's
    average)."""
    with torch.random.fork_rng(devices=[]):   # building it draws an init: leave the training streams alone
        copy = make().to(next(iter(model.parameters())).device)
    shard_gpt(copy)
    for mine, theirs in zip(local_shards(copy.parameters()), local_shards(model.parameters())):
        mine.copy_(theirs)
    for mine, theirs in zip(copy.buffers(), model.buffers()):
        mine.copy_(theirs)
    return copy


def gathered_copy(model: torch.nn.Module, make: callable) -> torch.nn.Module | None:
    """A plain, unsharded copy of a sharded model on rank 0 (None on the others; every rank must call): what
    the rank-0 evals run, since a sharded model runs only with every rank taking part."""
    state = FullStateModel(model).state_dict()
    if not state:
        return None
    with torch.random.fork_rng(devices=[]):   # building it draws an init: leave the training streams alone
        copy = make()
    copy.load_state_dict(state)
    return copy.to(next(iter(model.parameters())).device).eval()
