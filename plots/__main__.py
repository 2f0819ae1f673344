"""Turn runs' metrics.jsonl into PNG figures, and copy their newest image grids beside them.

    python -m plots runs/vqgan runs/gpt --out figures/
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from plots.figures import gpt_figures, vqgan_figures
from vqgpt.files import atomic_write_bytes
from vqgpt.runlog import METRICS_NAME, read_metrics


def run_stage(config_path: Path) -> str | None:
    """'vqgan' or 'gpt' from a run's config.json; None for anything else (a hand-edited or foreign file)."""
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    stage = config.get("stage") if isinstance(config, dict) else None
    return stage if stage in ("vqgan", "gpt") else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (made by train_resnet_vqgan.py or train_gpt.py)")
    parser.add_argument("--out", required=True, help="folder for the PNGs")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for run in map(Path, args.runs):
        if not (run / METRICS_NAME).is_file() or not (run / "config.json").is_file():
            print(f"plots: error: {run}: no {METRICS_NAME}/config.json; is it a run folder?", file=sys.stderr)
            return 2
        stage = run_stage(run / "config.json")
        if stage is None:
            print(f"plots: error: {run / 'config.json'}: not the config of a vqgan or gpt run", file=sys.stderr)
            return 2
        records = read_metrics(run)
        draw = vqgan_figures if stage == "vqgan" else gpt_figures
        # "runs/vqgan" gives vqgan_curves.png, "runs/exp1" gives exp1_vqgan_curves.png
        prefix = run.name if run.name.endswith(stage) else f"{run.name}_{stage}"
        target = out / f"{prefix}_curves.png"
        panels = draw(records, target)
        print(f"{target}: {', '.join(panels) or 'no data yet'}")
        grids = sorted((run / "samples").glob("*.png")) if (run / "samples").is_dir() else []
        if grids:
            copy = out / f"{prefix}_{grids[-1].name}"
            atomic_write_bytes(copy, grids[-1].read_bytes())
            print(f"{copy}: newest grid of {run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
