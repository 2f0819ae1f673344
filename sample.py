"""Sample images from a trained GPT, decoded by the VQGAN that made its tokens.

    python sample.py --gpt runs/gpt --n 16 --out samples/blind
    python sample.py --gpt runs/gpt --n 16 --out samples/circles --class 0 --cfg 3.0
    python sample.py --gpt runs/gpt --n 8 --out samples/completion --complete data/shapes --keep-rows 4

Writes DIR/grid.png and DIR/sample_NNN.png; with --complete, DIR/completion.png shows the
originals, their reconstructions and the completions of their top --keep-rows token rows.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

from vqgpt.config import ConfigError, check_precision
from vqgpt.distributed import pick_device
from vqgpt.errors import exit_on_user_error
from vqgpt.images import image_grid, load_image_batch, save_png, to_uint8, to_unit_range
from vqgpt.sampling import sample_tokens
from vqgpt.shards import read_manifest
from vqgpt.trained_models import load_bound_vqgan, load_gpt
from vqgpt.training import autocast, resolve_precision


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpt", required=True, help="GPT run folder (latest checkpoint) or checkpoint file")
    parser.add_argument("--out", required=True, help="output folder for PNGs")
    parser.add_argument("--n", type=int, default=16, help="images to sample (default: 16)")
    parser.add_argument("--class", dest="class_id", type=int, default=None, help="class id (class-conditional models)")
    parser.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1: plain conditional)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (0: greedy)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely codes")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same images)")
    parser.add_argument("--complete", default=None, metavar="SHARDS_OR_IMAGES",
                        help="image shard folder (its val split), image folder or image file to complete")
    parser.add_argument("--keep-rows", type=int, default=None, help="token rows kept with --complete (default: half)")
    parser.add_argument("--vqgan", default="", help="VQGAN checkpoint (default: the one named by the tokens; sha256 checked)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--precision", default="auto",
                        help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16 or fp16; tokens are drawn in fp32")
    parser.add_argument("--no-kv-cache", action="store_true", help="recompute the whole prefix each step (slow reference)")
    return parser.parse_args(argv)


def check_options(args: argparse.Namespace) -> None:
    """Refuse bad sampling options before any checkpoint is loaded."""
    if args.n < 1:
        raise ConfigError(f"--n must be at least 1, got {args.n}")
    for flag, value in (("--temperature", args.temperature), ("--cfg", args.cfg), ("--top-p", args.top_p)):
        if value is not None and not math.isfinite(value):   # NaN passes every comparison below
            raise ConfigError(f"{flag} must be a finite number, got {value}")
    if args.temperature < 0:
        raise ConfigError(f"--temperature must be 0 (greedy) or positive, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.cfg < 0:
        raise ConfigError(f"--cfg must not be negative, got {args.cfg}")
    if args.cfg != 1 and args.class_id is None and not args.complete:
        raise ConfigError("--cfg guides towards a class: give --class K (or --complete labelled shards)")
    if args.keep_rows is not None and args.keep_rows < 0:
        raise ConfigError(f"--keep-rows must not be negative, got {args.keep_rows}")
    check_precision(args.precision)


def check_same_classes(shards: str, gpt_classes: list[str]) -> None:
    """Label k must mean the same class to the shards and to the GPT, or the completions are conditioned wrongly."""
    classes = read_manifest(shards).get("classes", [])
    if classes != gpt_classes:
        raise ConfigError(f"{shards}: its classes {classes[:6]}{'...' if len(classes) > 6 else ''} are not the GPT's "
                          f"{gpt_classes[:6]}{'...' if len(gpt_classes) > 6 else ''}; complete images of the GPT's data")


def main(argv=None) -> int:
    args = parse_args(argv)
    check_options(args)
    device = pick_device(args.device)
    with autocast(device, resolve_precision(args.precision, device)):
        return sample(args, device)


def sample(args: argparse.Namespace, device: torch.device) -> int:
    gpt = load_gpt(args.gpt, device)
    vqgan = load_bound_vqgan(gpt.token_manifest, args.vqgan, device, tokens_name=f"the tokens of {gpt.path}")
    config = gpt.config
    if args.class_id is not None and not 0 <= args.class_id < config.n_classes:
        raise ConfigError(f"--class {args.class_id} outside [0, {config.n_classes}) "
                          f"(classes: {gpt.token_manifest.get('classes', [])})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    options = dict(cfg_scale=args.cfg, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   generator=generator, use_kv_cache=not args.no_kv_cache)
    grid_rows, grid_width = gpt.token_manifest["latent_grid"]
    if args.complete:
        if args.keep_rows is not None and args.keep_rows > grid_rows:
            raise ConfigError(f"--keep-rows {args.keep_rows} exceeds the {grid_rows} token rows of an image")
        originals, labels = load_image_batch(args.complete, args.n, vqgan.config.image_size)
        if labels is not None and config.n_classes:
            check_same_classes(args.complete, gpt.token_manifest.get("classes", []))
        images = to_unit_range(torch.from_numpy(originals).to(device))
        with torch.no_grad():
            tokens = vqgan.model.encode_to_indices(images)
            reconstructions = to_uint8(vqgan.model.decode_indices(tokens))
        keep_rows = args.keep_rows if args.keep_rows is not None else gpt.token_manifest["latent_grid"][0] // 2
        label_tensor = torch.from_numpy(labels).to(device) if labels is not None and config.n_classes else None
        completed = sample_tokens(gpt.model, len(originals), labels=label_tensor,
                                  prefix=tokens[:, :keep_rows * grid_width], **options)
        with torch.no_grad():
            completions = to_uint8(vqgan.model.decode_indices(completed))
        save_png(out / "completion.png", image_grid([originals, reconstructions, completions]), upscale=2)
        outputs = completions
    else:
        labels = None
        if args.class_id is not None:
            labels = torch.full((args.n,), args.class_id, device=device, dtype=torch.long)
        tokens = sample_tokens(gpt.model, args.n, labels=labels, **options)
        with torch.no_grad():
            outputs = to_uint8(vqgan.model.decode_indices(tokens))
        save_png(out / "grid.png", image_grid([outputs[i:i + 8] for i in range(0, len(outputs), 8)]), upscale=2)
    for index, image in enumerate(outputs):
        save_png(out / f"sample_{index:03d}.png", np.ascontiguousarray(image))
    print(f"{out}: {len(outputs)} image(s) from {gpt.path.name} (step {gpt.step})")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main, "sample"))
