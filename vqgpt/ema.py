"""Weight EMA: an exponential moving average of a network's parameters, kept beside it for evaluation and sampling.

After each optimizer step that was taken (a skipped non-finite step changes nothing) every parameter moves
towards the trained one, ema = decay x ema + (1 - decay) x weight, and buffers are copied. It is a function of
the weights alone, so every DDP rank holds the same average (under --fsdp each rank averages its own shards: the
same numbers); checkpoints save it as `<stage>_ema`, a plain state dict of the same network, and the inference
loaders prefer it (`--weights raw` picks the trained weights).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch

from vqgpt.errors import CheckpointError, first_line
from vqgpt.fsdp import FullStateModel, is_sharded, local_shards

WEIGHT_CHOICES = ("ema", "raw")
WEIGHTS_HELP = "ema: the weight EMA when the checkpoint holds one (else the trained weights); raw: the trained weights"


def ema_key(stage: str) -> str:
    """Where a checkpoint keeps the EMA of its `stage` network."""
    return f"{stage}_ema"


class WeightEMA:
    def __init__(self, model: torch.nn.Module, decay: float, average: torch.nn.Module | None = None):
        """average: the module that keeps the average, holding the weights now (default: a copy of `model`; a
        sharded model needs one sharded like it)."""
        if not 0 <= decay < 1:   # 0: a copy of the weights after every step
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        # same layout and device as the network
        self.model = (copy.deepcopy(model) if average is None else average).requires_grad_(False)
        self.model.eval()
        self._pairs = list(zip(self.model.parameters(), model.parameters()))
        self._buffers = list(zip(self.model.buffers(), model.buffers()))

    @classmethod
    def start(cls, model: torch.nn.Module, decay: float, resume: dict | None, key: str,
              make_average: Callable[[], torch.nn.Module] | None = None) -> "WeightEMA | None":
        """The EMA of `model` (None when decay is 0): the resumed one when the checkpoint holds it, else a copy of
        the weights as they are now (a fresh run's, an --init-from source's, or those of a run resumed without one).
        make_average: builds the copy (see __init__)."""
        if not decay:
            return None
        ema = cls(model, decay, None if make_average is None else make_average())
        if resume is not None and key in resume:
            try:
                (FullStateModel(ema.model) if is_sharded(ema.model) else ema.model).load_state_dict(resume[key])
            except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as err:
                raise CheckpointError(f"{resume['path']}: its {key!r} state does not fit this run "
                                      f"({first_line(err)})") from None
        return ema

    @torch.no_grad()
    def update(self) -> None:
        averaged, trained = zip(*self._pairs)
        torch._foreach_lerp_(local_shards(averaged), local_shards(trained), 1.0 - self.decay)
        for mine, theirs in self._buffers:
            mine.copy_(theirs)
