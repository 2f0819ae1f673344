"""Import a published class-conditional GPT as a GPT run folder that every tool of this project takes.

    python import_vqgan.py --from llamagen --ckpt vq_ds16_c2i.pt --out runs/llamagen-vq16
    python import_gpt.py --from llamagen --ckpt c2i_B_256.pt --out runs/llamagen-gpt-b --vqgan runs/llamagen-vq16
    python sample.py --gpt runs/llamagen-gpt-b --class 207 --cfg 2 --out samples/b
    python train_gpt.py --tokens data/imgs-tokens --out runs/gpt-ft --init-from runs/llamagen-gpt-b
    python export.py runs/llamagen-gpt-b --out exports/llamagen-gpt-b

The checkpoint is read without running any code its pickle names (its argparse.Namespace becomes
an inert stand-in; anything else is refused). Every source tensor is mapped or listed as ignored.
`--help` lists every setting.
"""
from __future__ import annotations

import sys

from models.gpt import GPT
from vqgpt.config import parse_config
from vqgpt.errors import exit_on_user_error
from vqgpt.gpt_import import import_llamagen_gpt, write_imported_gpt
from vqgpt.importers import summarize_ignored
from vqgpt.settings import IMPORT_GPT_PRESETS, ImportGPTConfig
from vqgpt.trained_models import load_vqgan


def main(cfg: ImportGPTConfig) -> int:
    vqgan = load_vqgan(cfg.vqgan) if cfg.vqgan else None
    imported = import_llamagen_gpt(cfg.ckpt, cfg.n_head, cfg.grid_size, vqgan)
    out = write_imported_gpt(imported, cfg.out)
    config = imported.config
    side = round(config.tokens_per_image ** 0.5)
    print(f"{out}: {cfg.from_} GPT, {GPT(config).num_params() / 1e6:.2f}M parameters, {config.n_layer} layers of "
          f"{config.n_embd} ({config.n_head} heads, {config.kv_heads} key/value), {config.codebook_size} codes on "
          f"{side}x{side}, {config.n_classes} classes; "
          + (f"decodes with {vqgan.path}" if vqgan else "no --vqgan: fine-tune and export only"))
    for line in summarize_ignored(imported.ignored):
        print(f"  ignored: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(
        lambda: main(parse_config(ImportGPTConfig, IMPORT_GPT_PRESETS, description=__doc__)), "import_gpt"))
