"""Run logging: metrics.jsonl (one JSON object per line), TensorBoard, Weights & Biases on request, progress.

Progress is a tqdm bar on a terminal and plain lines elsewhere (`--progress auto`): a bar's carriage
returns turn a SLURM or Kubernetes log file into one endless line.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
import sys
import time
from pathlib import Path

from tqdm import tqdm

from vqgpt.errors import RunError
from vqgpt.files import atomic_write_bytes, file_inside

METRICS_NAME = "metrics.jsonl"
TENSORBOARD_NAME = "tensorboard"
WANDB_ID_NAME = "wandb_run_id"   # a resumed run goes on logging to the same wandb run


class PlainProgress:
    """tqdm's interface as far as this project uses it, written as whole lines: one at most every `seconds`
    (or every `every` updates, when given), and one at the end."""

    def __init__(self, iterable=None, total: int | None = None, desc: str = "", unit: str = "it", initial: int = 0,
                 seconds: float = 30.0, every: int = 0, **_ignored):
        self.iterable, self.desc, self.unit, self.seconds, self.every = iterable, desc, unit, seconds, every
        self.total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
        self.n = self.shown = initial
        self.last = time.perf_counter()
        self.postfix = ""

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        due = self.n % self.every == 0 if self.every else now - self.last >= self.seconds
        if due or self.n == self.total:
            self._line(now)

    def set_postfix(self, values: dict | None = None, refresh: bool = True) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in (values or {}).items())

    def write(self, message: str) -> None:
        print(message, flush=True)

    def close(self) -> None:
        if self.shown != self.n:
            self._line(time.perf_counter())

    def _line(self, now: float) -> None:
        rate = (self.n - self.shown) / max(now - self.last, 1e-9)
        of = f"/{self.total}" if self.total else ""
        print(f"{self.desc}: {self.n}{of} {self.unit} ({rate:.3g} {self.unit}/s)" + (f", {self.postfix}" if self.postfix
              else ""), file=sys.stderr, flush=True)
        self.last, self.shown = now, self.n


def progress(mode: str | bool, iterable=None, *, enabled: bool = True, **kwargs):
    """A tqdm bar (`mode` true, or auto on a terminal), plain lines (auto elsewhere) or nothing (false, or
    not `enabled`, as on ranks other than 0). kwargs: tqdm's total, desc, unit, initial; `every` (plain lines
    every so many updates instead of every 30 seconds)."""
    mode = {True: "true", False: "false"}.get(mode, mode)
    every = kwargs.pop("every", 0)
    if mode == "false" or not enabled:
        return tqdm(iterable, disable=True, **kwargs)
    if mode == "true" or sys.stderr.isatty():
        return tqdm(iterable, dynamic_ncols=True, **kwargs)
    return PlainProgress(iterable, every=every, **kwargs)


def _clean(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a run's metrics.jsonl (or of RUN/metrics.jsonl); a line that is not UTF-8 is a RunError."""
    path = Path(path)
    if path.is_dir():
        path = file_inside(path, METRICS_NAME, RunError)
    return [record for record in map(_parse, metrics_lines(path)) if record is not None]


def metrics_lines(path: Path) -> list[str]:
    """The lines of metrics.jsonl, ends kept. This project writes JSON (ASCII): bytes that are not UTF-8 were put
    there by something else, and are refused with their line number rather than dropped or a traceback."""
    lines = path.read_bytes().splitlines(keepends=True)
    for number, line in enumerate(lines, 1):
        try:
            line.decode()
        except UnicodeDecodeError:
            raise RunError(f"{path}: line {number} is not UTF-8 text; remove or fix that line (nothing was "
                           "changed)") from None
    return [line.decode() for line in lines]


def read_run_config(run_dir: str | os.PathLike, name: str = "config.json") -> dict | None:
    """A run folder's config.json as written by the trainers (None when absent); anything else is a RunError."""
    path = file_inside(run_dir, name, RunError)
    if not path.exists():
        return None
    try:
        config = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as err:
        raise RunError(f"{path}: not a readable run config ({type(err).__name__}); move it away or use another "
                       "run folder (nothing was changed)") from None
    if not isinstance(config, dict) or not isinstance(config.get("config", {}), dict):
        raise RunError(f"{path}: not a run config (a JSON {type(config).__name__}, not an object with a config); "
                       "move it away or use another run folder (nothing was changed)")
    return config


def _parse(line: str) -> dict | None:
    """One metrics.jsonl record; None for a blank or torn line (a kill mid-append)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def require_wandb(project: str) -> None:
    """`--wandb PROJECT` without the package stops every rank before the run starts (not rank 0 hours in)."""
    if project and importlib.util.find_spec("wandb") is None:
        raise RunError(f"--wandb {project}: the wandb package is not installed; pip install wandb (or drop --wandb)")


def start_wandb(run_dir: Path, project: str):
    """A wandb run under RUN/wandb/ (offline with WANDB_MODE=offline) whose config is the run's config.json; a
    resumed run continues the same one."""
    import wandb

    config_path = run_dir / "config.json"   # written by the trainer (vqgpt/training.py) before its RunLog
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    id_path = run_dir / WANDB_ID_NAME
    run_id = id_path.read_text().strip() if id_path.is_file() else ""
    if not run_id:
        run_id = secrets.token_hex(8)
        atomic_write_bytes(id_path, run_id.encode())
    return wandb.init(project=project, id=run_id, resume="allow", name=run_dir.resolve().name, dir=str(run_dir),
                      config=config)


def _step(record: dict) -> float:
    """A record's step; a hand-edited one without a number counts as step 0 (kept on resume, not a traceback)."""
    step = record.get("step", 0)
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else 0


class RunLog:
    """Main-rank logger; on other ranks every method is a no-op. Scalars go to metrics.jsonl and TensorBoard
    (`RUN/tensorboard/`), and with `wandb_project` to that Weights & Biases project too."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool, total_steps: int, start_step: int,
                 description: str, progress_mode: str = "auto", every: int = 10, wandb_project: str = ""):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_NAME
        self.bar = None
        self.writer = None
        self.wandb = None
        self.every = max(1, every)
        if not enabled:
            return
        self._drop_records_after(start_step)
        from torch.utils.tensorboard import SummaryWriter   # here, not at import: it costs a second

        self.writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD_NAME), purge_step=start_step)
        if wandb_project:
            self.wandb = start_wandb(Path(run_dir), wandb_project)
        self.bar = progress(progress_mode, total=total_steps, initial=start_step, desc=description, unit="step",
                            every=every)

    def _drop_records_after(self, step: int) -> None:
        """A resumed run rewrites the steps after its checkpoint; keep the file free of duplicates."""
        if not self.path.exists():
            return
        kept = [line for line in metrics_lines(self.path)
                if (record := _parse(line)) is not None and _step(record) <= step]
        atomic_write_bytes(self.path, "".join(kept).encode())

    def log(self, step: int, kind: str, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        scalars = {f"{kind}/{key}": value for key, value in record.items()
                   if isinstance(value, (int, float)) and key != "step"}
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def advance(self, postfix: dict | None = None) -> None:
        """One step on the bar; `postfix` (tensors welcome) is shown every `every` steps only, so the other steps
        read no device value back (a host sync per step on CUDA)."""
        if self.bar is None:
            return
        if postfix and (self.bar.n + 1) % self.every == 0:   # before update(): a plain line shows this step's
            shown = {k: _clean(v) for k, v in postfix.items()}
            self.bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in shown.items()},
                                 refresh=False)
        self.bar.update(1)

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
