"""Export a VQGAN or GPT as config.json + model.safetensors (weights only, no pickle) + a model card.

    python export.py runs/vqgan --out exports/vqgan
    python export.py runs/gpt/step_00003000.pt --out exports/gpt
    python export.py runs/gpt --out exports/gpt-raw --weights raw      # the trained weights, not their EMA
    python image_quantizer.py --vqgan exports/vqgan --data data/shapes --out data/shapes-tokens

`vqgpt.export.from_pretrained(DIR)` loads the folder, and every --vqgan /
--gpt option takes it. `--help` lists every setting.
"""
from __future__ import annotations

import sys

from vqgpt.config import parse_config

from vqgpt.settings import EXPORT_PRESETS, ExportConfig
from vqgpt.errors import exit_on_user_error
from vqgpt.export import export_run


def main(cfg: ExportConfig) -> int:
    out = export_run(cfg.run, cfg.out, cfg.weights)
    print(f"{out}: config.json, model.safetensors, README.md")
    return 0


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv and not argv[0].startswith("-"):   # `export.py RUN --out DIR`: the run may come first, unnamed
        argv = ["--run", *argv]
    sys.exit(exit_on_user_error(
        lambda: main(parse_config(ExportConfig, EXPORT_PRESETS, argv, description=__doc__)), "export"))
