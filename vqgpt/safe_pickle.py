"""Reading other projects' pickled checkpoints without running the code their pickles name.

taming's Lightning `last.ckpt` names Lightning callback classes (and sometimes OmegaConf configs
and numpy scalars), so `torch.load(weights_only=True)` refuses it, while `weights_only=False`
would call whatever the file says. Here torch's weights-only unpickler reads it with every such
known foreign class replaced by an inert `StandIn`; any other global is refused before loading.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from vqgpt.checkpoint import CheckpointError

# globals that only carry training bookkeeping in published checkpoints; they load as StandIns
STAND_IN_MODULES = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "omegaconf.", "numpy.")
STAND_IN_GLOBALS = ("argparse.Namespace", "typing.Any", "pathlib.PosixPath", "pathlib.WindowsPath")


class StandIn:
    """What a known foreign object becomes: its original name and the data it was built from; no behaviour."""

    original = "?"

    def __new__(cls, *args, **kwargs):
        instance = super().__new__(cls)
        instance.args = args
        return instance

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<stand-in for {self.original}>"


def is_stand_in_name(full_name: str) -> bool:
    return full_name in STAND_IN_GLOBALS or full_name.startswith(STAND_IN_MODULES)


def _stand_in_class(full_name: str) -> type:
    return type(full_name.rsplit(".", 1)[-1], (StandIn,), {"original": full_name, "__module__": __name__})


def load_foreign_checkpoint(path: str | Path):
    """The object a published torch checkpoint holds (tensors on the CPU), foreign classes as StandIns.

    Raises CheckpointError, with one line naming the file, for a missing, truncated or foreign file
    and for a pickle that names any other class or function (it could run code on load).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a torch checkpoint in the zip format of torch >= 1.6 "
                              "(truncated, or not a checkpoint); re-download it")
    try:
        unknown = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as err:   # a damaged zip or pickle
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {_first_line(err)})") from None
    refused = sorted(name for name in unknown if not is_stand_in_name(name))
    if refused:
        raise CheckpointError(f"{path}: refused: its pickle names {', '.join(refused)}, which could run code on "
                              "load; only tensors, containers and Lightning/OmegaConf/numpy bookkeeping are read")
    stand_ins = [(_stand_in_class(name), name) for name in unknown]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:   # truncated data records, a refusal inside the unpickler
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no details"
