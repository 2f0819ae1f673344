"""The one DDP helper: read torchrun's environment, pick a backend and a device."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from vqgpt.errors import RunError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    is_main: bool

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def device_type(self) -> str:
        return self.device.type


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"--device {preference} was asked for but no CUDA device is visible; use --device cpu")
    if preference == "cuda":
        return torch.device("cuda", local_rank)
    try:
        device = torch.device(preference)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):   # meta, xla, ...: nothing here trains on them
        raise RunError(f"--device must be auto, cpu, cuda or cuda:N, got {preference!r}")
    return device


def launcher_rank() -> int:
    """The rank torchrun gave this process (0 for a plain `python` run)."""
    return int(os.environ.get("RANK", "0"))


def setup(device: str = "auto", timeout_minutes: int = 30) -> DistInfo:
    """Initialise the process group when launched by torchrun; a plain `python` run is world size 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = launcher_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = pick_device(device, local_rank)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=torch_device if backend == "nccl" else None)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=torch_device, is_main=rank == 0)


def split_global_batch(cfg, world_size: int):
    """`cfg` with batch_size and grad_accum that give its global_batch_size on `world_size` ranks: the fewest
    micro-steps whose micro-batch is at most cfg.batch_size (unchanged when global_batch_size is 0)."""
    total = getattr(cfg, "global_batch_size", 0)
    if not total:
        return cfg
    if total % world_size:
        raise RunError(f"--global-batch-size {total} does not split over {world_size} ranks; give a multiple of "
                       f"{world_size}")
    per_rank = total // world_size
    fewest = -(-per_rank // cfg.batch_size)
    # the smallest divisor of per_rank from `fewest` on, by its pairs up to the square root (a prime per_rank of
    # 10**12 would otherwise take 10**12 trials)
    divisors = {d for small in range(1, math.isqrt(per_rank) + 1) if per_rank % small == 0
                for d in (small, per_rank // small)}
    accum = min(d for d in divisors if d >= fewest)
    return dataclasses.replace(cfg, batch_size=per_rank // accum, grad_accum=accum)


def launch(train_fn, cfg) -> int:
    """setup() from cfg.device, train_fn(cfg, dist_info), and the process group torn down whatever happens."""
    info = setup(cfg.device)
    try:
        return train_fn(split_global_batch(cfg, info.world_size), info)
    finally:
        cleanup()


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP with gradients kept as views into the all-reduce buckets (one copy fewer per step)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s object on every rank (identity when not distributed)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list:
    if not dist.is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(obj: Any) -> list | None:
    """Every rank's object, in rank order, on rank 0; None on the other ranks ([obj] when not distributed)."""
    if not dist.is_initialized():
        return [obj]
    out: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on at least one (e.g. a SIGTERM seen by one rank)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def no_sync(module: torch.nn.Module, skip: bool):
    """DDP's no_sync for accumulation micro-steps (FSDP2: no reduce-scatter until the last); a no-op for plain
    modules."""
    if hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(not skip)
        return contextlib.nullcontext()
    return module.no_sync() if skip and hasattr(module, "no_sync") else contextlib.nullcontext()
