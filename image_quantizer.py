"""Rewrite image shards as codebook-index token shards, bound to the VQGAN checkpoint that made them.

    python image_quantizer.py --vqgan runs/vqgan --data data/shapes --out data/shapes-tokens
    torchrun --standalone --nproc_per_node=2 image_quantizer.py --vqgan runs/vqgan/step_00010000.pt \
        --data data/imgs --out data/imgs-tokens --flip true

Output: TOKENS/{train,val}_NNNNN.npy uint16 (N, h*w) in raster order (+ train_flip_* with --flip,
train_cropJ_* with --crops K),
labels beside them, codebook_histogram.npy, codebook_usage.png and manifest.json (written last,
with the checkpoint's sha256). A rerun skips finished shards; `--help` lists every setting.
"""
from __future__ import annotations

import functools
import sys

from plots.figures import codebook_histogram
from vqgpt import distributed
from vqgpt.config import parse_config
from vqgpt.settings import QUANTIZE_PRESETS, QuantizeConfig
from vqgpt.errors import exit_on_user_error
from vqgpt.quantize import Encoder, quantize
from vqgpt.trained_models import load_vqgan
from vqgpt.training import resolve_precision


def main(cfg: QuantizeConfig) -> int:
    dist = distributed.setup(cfg.device)
    try:
        vqgan = load_vqgan(cfg.vqgan, dist.device, cfg.weights)
        manifest = quantize(vqgan, cfg.data, cfg.out, batch_size=cfg.batch_size, flip=cfg.flip, crops=cfg.crops,
                            dist=dist,
                            dtype=resolve_precision(cfg.precision, dist.device), progress=cfg.progress,
                            encoder=Encoder.of(vqgan, compile=cfg.compile, channels_last=cfg.channels_last),
                            plot_usage=functools.partial(codebook_histogram, title="dataset codebook usage"))
    finally:
        distributed.cleanup()
    if manifest is not None:
        counts = ", ".join(f"{split} {entry['count']}" for split, entry in manifest["splits"].items())
        usage = manifest["usage"]
        print(f"{cfg.out}: token grids {manifest['latent_grid'][0]}x{manifest['latent_grid'][1]} "
              f"({counts}); codebook usage {100 * usage['codebook_usage']:.1f}% "
              f"({usage['codes_used']}/{manifest['codebook_size']}), perplexity {usage['perplexity']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(
        lambda: main(parse_config(QuantizeConfig, QUANTIZE_PRESETS, description=__doc__)), "image_quantizer"))
