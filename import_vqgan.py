"""Import a published VQ tokenizer as a VQGAN run folder that every tool of this project takes.

    python import_vqgan.py --from taming --ckpt last.ckpt --config model.yaml --out runs/taming
    python import_vqgan.py --from llamagen --ckpt vq_ds16_c2i.pt --out runs/llamagen-vq16 --image-size 256
    python image_quantizer.py --vqgan runs/taming --data data/imgs --out data/imgs-tokens
    python train_resnet_vqgan.py --data data/imgs --out runs/ft --init-from runs/taming --lpips-weights runs/taming/lpips_vgg16.pth

The checkpoint is read without running any code its pickle names (Lightning and OmegaConf objects
become inert stand-ins; anything else is refused). Every source tensor is mapped or listed as
ignored. `--help` lists every setting.
"""
from __future__ import annotations

import sys

from models.vqgan import VQGAN, count_parameters
from vqgpt.config import parse_config
from vqgpt.settings import IMPORT_PRESETS, ImportConfig
from vqgpt.errors import exit_on_user_error
from vqgpt.importers import (LPIPS_VGG_NAME, import_llamagen, import_taming, summarize_ignored,
                             write_imported_run)


def main(cfg: ImportConfig) -> int:
    if cfg.from_ == "taming":
        imported = import_taming(cfg.ckpt, cfg.config)
    else:
        imported = import_llamagen(cfg.ckpt, cfg.image_size, cfg.l2_norm)
    out = write_imported_run(imported, cfg.out)
    config = imported.config
    side = config.image_size // config.downsample_factor
    print(f"{out}: {cfg.from_} VQGAN, {count_parameters(VQGAN(config)) / 1e6:.2f}M parameters, "
          f"{config.codebook_size} codes of {config.codebook_dim} dims ({config.quantizer}), latent grid {side}x{side} "
          f"at {config.image_size} px; discriminator {'mapped' if imported.discriminator else 'none (a fine-tune starts one)'}")
    for line in summarize_ignored(imported.ignored):
        print(f"  ignored: {line}")
    if imported.lpips_vgg is not None:
        print(f"  LPIPS VGG16 written to {out / LPIPS_VGG_NAME}: pass --lpips-weights {out / LPIPS_VGG_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(
        lambda: main(parse_config(ImportConfig, IMPORT_PRESETS, description=__doc__)), "import_vqgan"))
