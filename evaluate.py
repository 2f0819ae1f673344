"""Score a VQGAN (rFID), a GPT (gFID, sFID, precision / recall, IS) or any images with torch-fidelity, offline.

    python evaluate.py --vqgan runs/vqgan --data data/shapes                        # whole val split: rFID, PSNR, SSIM, ...
    python evaluate.py --gpt runs/gpt --ref data/shapes --n 50000 --cfg 1.5 --top-k 100 --save-samples samples/50k
    python evaluate.py --images samples/50k --ref VIRTUAL_imagenet256_labeled.npz   # any folder vs an ADM reference batch
    python evaluate.py --gpt runs/gpt --ref VIRTUAL_imagenet256_labeled.npz --n 50000 --save-npz samples.npz  # for ADM's evaluator
    torchrun --standalone --nproc_per_node=8 evaluate.py --gpt runs/gpt --ref data/imgs --num-samples 50000

The Inception weights (weights-inception-2015-12-05-6726825d.pth) come from --inception-weights
or the torch hub cache, never from the internet. Reference statistics of shard folders are cached
beside the shards, keyed by split and weights sha256. Under torchrun the batches are split over
the ranks and gathered on rank 0; the numbers equal one process's (spell --n as --num-samples
there: torchrun takes --n for an abbreviation of its own flags). The last line printed is one
JSON object (`--out FILE` writes it too). `--help` lists every setting.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from vqgpt import distributed
from vqgpt.config import ConfigError, config_to_dict, flag_name, parse_config
from vqgpt.settings import EVALUATE_PRESETS, EvaluateConfig
from vqgpt.errors import RunError, exit_on_user_error
from vqgpt.fid import (Inception, ImageSource, balanced_labels, extract_features, generate_images, load_inception,
                       open_images, reference_statistics)
from vqgpt.files import atomic_path, atomic_write_json
from vqgpt.images import save_png
from vqgpt.shards import ShardSplit
from vqgpt.trained_models import load_bound_vqgan, load_gpt, load_vqgan, optimize_for_inference
from vqgpt.training import configure_backends, resolve_precision
from vqgpt.vqgan_step import evaluate


# settings only some of the three evaluations read
READ_ONLY_BY = {**dict.fromkeys(("num_samples", "cfg", "cfg_schedule", "cfg_interval", "temperature", "top_k",
                                   "top_p", "seed", "save_samples", "save_npz"), ("gpt",)),
                "lpips_weights": ("vqgan",), "compile": ("gpt", "vqgan"), "channels_last": ("gpt", "vqgan"),
                "ref_split": ("gpt", "images"), "weights": ("gpt", "vqgan")}


def mode_of(cfg: EvaluateConfig) -> str:
    """Which of the three evaluations the flags ask for; anything ambiguous is refused before any work."""
    if cfg.gpt:
        if cfg.images or cfg.data:
            raise ConfigError("--gpt scores its own samples: drop --images / --data")
        mode = "gpt"
    elif cfg.vqgan:
        if cfg.images or cfg.ref:
            raise ConfigError("--vqgan compares reconstructions with their originals in --data: drop --images / --ref")
        if not cfg.data:
            raise ConfigError("--vqgan needs --data: the image shard folder whose --split it reconstructs")
        mode = "vqgan"
    elif cfg.images:
        mode = "images"
    else:
        raise ConfigError("give one of --vqgan RUN --data SHARDS, --gpt RUN --ref REF, or --images DIR --ref REF")
    if mode != "vqgan" and not cfg.ref:
        raise ConfigError(f"--{mode} needs --ref: an image shard folder, an image folder or an ADM-style .npz")
    defaults = EvaluateConfig()
    for name, modes in READ_ONLY_BY.items():   # given to another mode, they would be silently ignored
        if mode not in modes and getattr(cfg, name) != getattr(defaults, name):
            raise ConfigError(f"{flag_name(name)} applies to {' and '.join('--' + m for m in modes)} only")
    return mode


def evaluate_vqgan(cfg: EvaluateConfig, inception: Inception, dist: distributed.DistInfo) -> dict:
    dtype = resolve_precision(cfg.precision, dist.device)
    vqgan = load_vqgan(cfg.vqgan, dist.device, cfg.weights)
    optimize_for_inference(vqgan.model, compile=cfg.compile, channels_last=cfg.channels_last)
    split = ShardSplit(cfg.data, cfg.split)
    originals = ImageSource.from_shards(split)
    size = vqgan.config.image_size
    if split.item_shape != (size, size, 3):
        raise RunError(f"{cfg.data}: images are {split.item_shape[0]}x{split.item_shape[1]}, the VQGAN takes "
                       f"{size}x{size}; evaluate on shards made with --size {size}")
    perceptual = optional_lpips(cfg.lpips_weights, dist.device)
    # the pool features too: the cache then serves --images / --gpt against this split (precision / recall)
    reference = reference_statistics(cfg.data, cfg.split, inception, cfg.batch_size, rank=dist.rank,
                                     world_size=dist.world_size, use_cache=cfg.cache, progress=cfg.progress,
                                     keep_features=True)
    metrics, _ = evaluate(vqgan.model, perceptual, split, cfg.batch_size, vqgan.config.codebook_size, dist.device, dtype,
                          inception=inception, reference_stats=reference.stats, rank=dist.rank,
                          world_size=dist.world_size, progress=cfg.progress)
    if metrics is None:
        return {}
    return {"fid": metrics.pop("rfid"), "images": metrics.pop("val_images"), "split": cfg.split,
            "data": originals.description, **metrics, "lpips_weights": "pretrained" if perceptual else "absent",
            "checkpoint": str(vqgan.path), "checkpoint_sha256": vqgan.sha256, "step": vqgan.step,
            "weights": vqgan.weights, **reference.info}


def optional_lpips(weights_path: str, device):
    """LPIPS when its VGG weights are there; an explicit --lpips-weights that cannot be used is an error."""
    from models.perceptual import LPIPSWeightsMissing, build_lpips

    try:
        return build_lpips(weights_path or None).to(device)
    except LPIPSWeightsMissing:
        if weights_path:
            raise
        return None


def evaluate_gpt(cfg: EvaluateConfig, inception: Inception, dist: distributed.DistInfo) -> dict:
    dtype = resolve_precision(cfg.precision, dist.device)
    gpt = load_gpt(cfg.gpt, dist.device, cfg.weights)
    vqgan = load_bound_vqgan(gpt.token_manifest, cfg.vqgan, dist.device, tokens_name=f"the tokens of {gpt.path}")
    n_classes = gpt.config.n_classes
    if n_classes and cfg.num_samples % n_classes:
        lower = cfg.num_samples - cfg.num_samples % n_classes
        raise ConfigError(f"--num-samples {cfg.num_samples} is not a multiple of the model's {n_classes} classes; use {lower or n_classes} "
                          f"or {lower + n_classes} so that every class gets the same number of samples")
    if cfg.cfg != 1 and not n_classes:
        raise ConfigError("--cfg guides towards classes, but this GPT was trained without classes; leave it at 1")
    optimize_for_inference(gpt.model, compile=cfg.compile)
    optimize_for_inference(vqgan.model, compile=cfg.compile, channels_last=cfg.channels_last)
    reference = reference_statistics(cfg.ref, cfg.ref_split, inception, cfg.batch_size, rank=dist.rank,
                                     world_size=dist.world_size, use_cache=cfg.cache, progress=cfg.progress,
                                     keep_features=True)
    labels = balanced_labels(cfg.num_samples, n_classes)
    sampling = dict(cfg_scale=cfg.cfg if n_classes else 1.0, cfg_schedule=cfg.cfg_schedule, cfg_interval=cfg.cfg_interval,
                    temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p if cfg.top_p < 1 else None)
    save_dir = Path(cfg.save_samples) if cfg.save_samples else None
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
    kept: dict[int, np.ndarray] = {}   # this rank's batches for --save-npz

    def make_batch(start: int, stop: int) -> np.ndarray:
        images = generate_images(gpt.model, vqgan.model, labels, start, stop, seed=cfg.seed, dtype=dtype, **sampling)
        if save_dir is not None:
            for index, image in enumerate(images, start):
                label = "" if labels is None else f"_class{labels[index]}"
                save_png(save_dir / f"{index:06d}{label}.png", image)
        if cfg.save_npz:
            kept[start] = images
        return images

    features = extract_features(cfg.num_samples, cfg.batch_size, make_batch, inception, rank=dist.rank,
                                world_size=dist.world_size, progress=cfg.progress, desc="sample + inception")
    if cfg.save_npz:
        save_npz(cfg.save_npz, kept, labels, dist.world_size)
    if features is None:
        return {}
    counts = np.bincount(labels, minlength=n_classes).tolist() if labels is not None else []
    return {**reference.scores(features), "images": len(features), "images_per_class": counts,
            "checkpoint": str(gpt.path), "step": gpt.step, "weights": gpt.weights, "vqgan_sha256": vqgan.sha256,
            "sampling": {"cfg": sampling["cfg_scale"], "cfg_schedule": cfg.cfg_schedule, "cfg_interval": cfg.cfg_interval,
                         "temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p, "seed": cfg.seed},
            **reference.info}


def save_npz(path: str, kept: dict[int, np.ndarray], labels: np.ndarray | None, world_size: int) -> None:
    """All ranks' samples in order, as ADM's evaluator reads them: arr_0 uint8 (N, H, W, 3), arr_1 the classes."""
    gathered = distributed.gather_to_main(kept) if world_size > 1 else [kept]
    if gathered is None:
        return
    batches = {start: images for part in gathered for start, images in part.items()}
    arrays = {"arr_0": np.concatenate([batches[start] for start in sorted(batches)])}
    if labels is not None:
        arrays["arr_1"] = labels
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:   # a handle: np.savez would add .npz to the temporary name
            np.savez(handle, **arrays)


def evaluate_images(cfg: EvaluateConfig, inception: Inception, dist: distributed.DistInfo) -> dict:
    source = open_images(cfg.images, cfg.split)
    if source.count < 2:
        raise RunError(f"{cfg.images}: holds {source.count} image; FID needs at least 2")
    reference = reference_statistics(cfg.ref, cfg.ref_split, inception, cfg.batch_size, rank=dist.rank,
                                     world_size=dist.world_size, use_cache=cfg.cache, progress=cfg.progress,
                                     keep_features=True)
    features = extract_features(source.count, cfg.batch_size, source.read, inception, rank=dist.rank,
                                world_size=dist.world_size, progress=cfg.progress, desc="images")
    if features is None:
        return {}
    result = {**reference.scores(features), "images": len(features), "source": source.description}
    if source.shards is not None:
        result["split"] = cfg.split
    return {**result, **reference.info}


def main(cfg: EvaluateConfig) -> int:
    mode_of(cfg)   # refused before torchrun's process group or any file is touched
    return distributed.launch(run, cfg)


def run(cfg: EvaluateConfig, dist: distributed.DistInfo) -> int:
    mode = mode_of(cfg)
    configure_backends(dist.device)
    inception = load_inception(cfg.inception_weights, dist.device)   # before any work: missing weights stop here
    scorers = {"vqgan": evaluate_vqgan, "gpt": evaluate_gpt, "images": evaluate_images}
    result = scorers[mode](cfg, inception, dist)
    if dist.is_main:
        result = {"mode": mode, **result, "inception_weights": str(inception.path),
                  "inception_weights_sha256": inception.sha256, "world_size": dist.world_size,
                  "config": config_to_dict(cfg)}
        if cfg.out:
            Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(cfg.out, result)
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(
        lambda: main(parse_config(EvaluateConfig, EVALUATE_PRESETS, description=__doc__)), "evaluate"))
