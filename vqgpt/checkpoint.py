"""Atomic checkpoints, the `latest` pointer, pruning, RNG capture, and safe loading."""
from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import torch

from vqgpt.errors import CheckpointError
from vqgpt.files import atomic_path, atomic_write_bytes, file_inside

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{8})\.pt$")
LATEST_NAME = "latest"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def save_checkpoint(run_dir: str | Path, step: int, state: dict, keep_last: int = 3, keep_every: int = 0) -> Path:
    """Write `state` atomically, point `latest` at it, keep the newest `keep_last` files and every milestone
    (a step that is a multiple of `keep_every`, when set).

    Call on the main rank only; the caller puts a barrier after it.
    """
    run_dir = Path(run_dir)
    path = run_dir / checkpoint_name(step)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    atomic_write_bytes(run_dir / LATEST_NAME, (path.name + "\n").encode())
    if keep_last > 0:
        # only this branch's history counts: after `--resume` from an older checkpoint, newer files
        # belong to the abandoned continuation (and are overwritten as the run reaches their steps)
        history = [p for p in list_checkpoints(run_dir) if p.name <= path.name]   # zero-padded: name order is step order
        for old in history[:-keep_last]:
            if not (keep_every and checkpoint_step(old) % keep_every == 0):
                old.unlink(missing_ok=True)
    return path


def checkpoint_step(path: Path) -> int:
    """The step in a checkpoint's name, step_XXXXXXXX.pt."""
    return int(path.name[len("step_"):-len(".pt")])


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint files of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if CHECKPOINT_PATTERN.match(p.name))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST_NAME
    if pointer.is_file() and not pointer.is_symlink():
        try:
            name = pointer.read_text(errors="replace").strip()
        except OSError:
            name = ""
        # only a plain checkpoint name inside this folder: `latest` must not lead anywhere else
        if CHECKPOINT_PATTERN.match(name) and (run_dir / name).is_file():
            return file_inside(run_dir, name, CheckpointError)
    found = list_checkpoints(run_dir)
    return file_inside(run_dir, found[-1].name, CheckpointError) if found else None   # a planted link out: refused


def resolve_checkpoint(path_or_run: str | Path) -> Path:
    """A checkpoint file, or a run folder -> its latest checkpoint."""
    path = Path(path_or_run)
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"{path}: run folder holds no checkpoint (step_XXXXXXXX.pt)")
        return latest
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file or run folder")
    return path


def load_checkpoint(path: str | Path, required_keys: tuple[str, ...] = (), mmap: bool = False) -> dict:
    """torch.load with weights_only=True, turned into one clear error for any bad file.

    mmap: tensors stay in the file (paged in when read), so holding the state costs no memory.
    """
    path = resolve_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises many kinds for truncated / foreign / malicious files
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({first_line})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint of this project (top level is {type(state).__name__})")
    missing = [k for k in required_keys if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not the right kind of checkpoint (missing {', '.join(missing)})")
    check_field_types(path, state)
    return state


_FIELD_TYPES = {"stage": str, "step": int, "config": dict, "world_size": int, "rng": list}
MAX_STEP = 10 ** 8 - 1   # the eight digits of step_XXXXXXXX.pt


def check_field_types(path: Path, state: dict) -> None:
    """A crafted file may hold a list where the config goes: refuse it here, not as a traceback later."""
    for key, expected in _FIELD_TYPES.items():
        value = state.get(key, expected())
        if not isinstance(value, expected) or isinstance(value, bool) or (expected is int and value < 0):
            raise CheckpointError(f"{path}: field {key!r} holds {type(value).__name__} {str(value)[:40]!r}, "
                                  f"expected a {'non-negative ' if expected is int else ''}{expected.__name__}")
    if state.get("step", 0) > MAX_STEP:
        raise CheckpointError(f"{path}: claims step {state['step']}, beyond the {MAX_STEP} a run's checkpoint names "
                              "can count; not a checkpoint this project wrote")


def capture_rng_state() -> dict:
    """Every RNG a training step can touch, in a form weights_only loading accepts."""
    version, mt_state, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [version, list(mt_state), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def all_finite(module_states: dict[str, dict]) -> bool:
    """True when every floating tensor of every state dict is finite (never save a NaN model)."""
    for state_dict in module_states.values():
        for tensor in state_dict.values():
            if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
                return False
    return True
