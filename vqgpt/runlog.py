"""Run logging: metrics.jsonl (one JSON object per line), TensorBoard when installed, a tqdm bar."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from tqdm import tqdm

from vqgpt.files import atomic_write_bytes

METRICS_NAME = "metrics.jsonl"


def _clean(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


def read_metrics(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_NAME
    with open(path) as handle:
        return [record for record in map(_parse, handle) if record is not None]


def _parse(line: str) -> dict | None:
    """One metrics.jsonl record; None for a blank or torn line (a kill mid-append)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


class RunLog:
    """Main-rank logger; on other ranks every method is a no-op."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool, total_steps: int, start_step: int,
                 description: str):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_NAME
        self.bar = None
        self.writer = None
        if not enabled:
            return
        self._drop_records_after(start_step)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step)
        except ImportError:
            self.writer = None
        self.bar = tqdm(total=total_steps, initial=start_step, desc=description, unit="step", dynamic_ncols=True)

    def _drop_records_after(self, step: int) -> None:
        """A resumed run rewrites the steps after its checkpoint; keep the file free of duplicates."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines(keepends=True)
                if (record := _parse(line)) is not None and record.get("step", 0) <= step]
        atomic_write_bytes(self.path, "".join(kept).encode())

    def log(self, step: int, kind: str, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(f"{kind}/{key}", value, step)

    def advance(self, postfix: dict | None = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if postfix:
                self.bar.set_postfix({k: f"{_clean(v):.4g}" if isinstance(_clean(v), float) else v
                                      for k, v in postfix.items()}, refresh=False)

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
