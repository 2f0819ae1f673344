"""Benchmark evaluate.py's work: Inception features (one thread, 2 ranks) and sample generation + decoding.

    taskset -c 0 python bench/evaluate.py                    # one pinned thread, then 2 ranks under torchrun
    python bench/evaluate.py --device cuda --batch-size 50 --images 500 --samples 100

Features: `--images` random uint8 images of `--image-size` through torch-fidelity's InceptionV3
(resized to 299 inside, so the size barely matters) via vqgpt.fid.extract_features, as
evaluate.py runs them. Generation: the `g256` GPT (256 tokens, KV cache, top-k 100) and the
`b64` VQGAN's decoder at 128 px (its 16 x 16 grid is g256's 256 tokens), untrained, via
vqgpt.fid.generate_images. Without real Inception weights (--inception-weights or the torch hub
cache) a random network of the same architecture stands in: same cost, meaningless FIDs.
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import emit, setup_worker, single_process_device, spawn_torchrun  # noqa: E402
from models.gpt import GPT, GPT_PRESETS  # noqa: E402
from models.vqgan import VQGAN, VQGAN_PRESETS  # noqa: E402
from vqgpt import distributed  # noqa: E402
from vqgpt.fid import (InceptionWeightsError, balanced_labels, extract_features, find_inception_weights,  # noqa: E402
                       generate_images, load_inception, save_random_inception)


def random_images(count: int, size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def extraction_rate(inception, images: np.ndarray, batch_size: int, rank: int = 0, world_size: int = 1) -> float:
    """Images/s of extract_features over all images (every rank's share, the gather included)."""
    extract_features(min(batch_size, len(images)), batch_size, lambda a, b: images[a:b], inception)   # warm-up
    distributed.barrier()
    start = time.perf_counter()
    extract_features(len(images), batch_size, lambda a, b: images[a:b], inception, rank=rank, world_size=world_size)
    return len(images) / (time.perf_counter() - start)


def worker(args) -> None:
    dist = setup_worker(args.device)
    inception = load_inception(args.inception_weights, dist.device)
    rate = extraction_rate(inception, random_images(args.images, args.image_size), args.batch_size,
                           dist.rank, dist.world_size)
    if dist.is_main:
        print('{"extract_images_per_s": %f}' % rate)
    distributed.barrier()   # every rank done before gloo closes: a rank once aborted at exit under load
    distributed.cleanup()


def generation_rate(samples: int, batch_size: int, device: torch.device, dtype: torch.dtype) -> tuple[float, dict]:
    torch.manual_seed(0)
    # b64's attention sits at its last level's grid, 8 at 64 px and 16 at 128 px
    vqgan_config = dataclasses.replace(VQGAN_PRESETS["b64"], image_size=128, attn_resolutions=(16,))
    vqgan = VQGAN(vqgan_config).to(device).eval()
    n_classes = 10
    gpt_config = dataclasses.replace(GPT_PRESETS["g256"], codebook_size=vqgan_config.codebook_size, n_classes=n_classes)
    gpt = GPT(gpt_config).to(device).eval()
    assert gpt_config.tokens_per_image == vqgan.latent_grid[0] * vqgan.latent_grid[1]
    labels = balanced_labels(samples, n_classes)
    options = dict(seed=0, dtype=dtype, top_k=100)
    generate_images(gpt, vqgan, labels, 0, min(batch_size, samples), **options)   # warm-up
    start = time.perf_counter()
    for begin in range(0, samples, batch_size):
        generate_images(gpt, vqgan, labels, begin, min(begin + batch_size, samples), **options)
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = samples / (time.perf_counter() - start)
    return rate, {"gpt_tokens_per_image": gpt_config.tokens_per_image, "decoded_image_size": vqgan_config.image_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="images through Inception")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=16, help="images generated and decoded")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ranks", type=int, default=2, help="also time this many ranks under torchrun (0: skip)")
    parser.add_argument("--inception-weights", default="")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    device, dtype = single_process_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            weights, kind = find_inception_weights(args.inception_weights), "real"
        except InceptionWeightsError:
            weights, kind = save_random_inception(Path(tmp) / "random_inception.pth"), "random (same architecture)"
        args.inception_weights = str(weights)
        results = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "batch_size": args.batch_size,
                   "inception_weights": kind, "images": args.images, "image_size": args.image_size}
        inception = load_inception(str(weights), device)
        results["extract_images_per_s"] = extraction_rate(inception, random_images(args.images, args.image_size),
                                                          args.batch_size)
        if args.ranks > 1 and device.type == "cpu":
            worker_args = ["--worker", "--images", str(args.images), "--image-size", str(args.image_size),
                           "--batch-size", str(args.batch_size), "--inception-weights", args.inception_weights]
            multi = spawn_torchrun(__file__, args.ranks, worker_args)
            results[f"extract_images_per_s_{args.ranks}_ranks"] = multi["extract_images_per_s"]
            results[f"extract_scaling_{args.ranks}_ranks"] = multi["extract_images_per_s"] / results["extract_images_per_s"]
    rate, shapes = generation_rate(args.samples, args.batch_size, device, dtype)
    results.update({"generation": "gpt g256 + vqgan b64 decoder", "samples": args.samples, **shapes,
                    "generate_decode_images_per_s": rate})
    emit(results)


if __name__ == "__main__":
    main()
