"""Sample images from a trained GPT, decoded by the VQGAN that made its tokens.

    python sample.py --gpt runs/gpt --n 16 --out samples/blind
    python sample.py --gpt runs/gpt --n 16 --out samples/circles --class 0 --cfg 3.0
    python sample.py --gpt runs/gpt --n 8 --out samples/completion --complete data/shapes --keep-rows 4

    python sample.py --gpt runs/gpt --n 64 --out samples/ramp --class 0 --cfg 4 --cfg-schedule linear --save-tokens

Writes DIR/grid.png and DIR/sample_NNN.png (and DIR/tokens.npy with --save-tokens); with --complete,
DIR/completion.png shows the originals, their reconstructions and the completions of their top
--keep-rows token rows. A GPT whose VQGAN is absent (and no --vqgan given) writes DIR/tokens.npy
only. `--help` lists every setting.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from vqgpt.config import ConfigError, parse_config

from vqgpt.settings import SAMPLE_PRESETS, SampleConfig
from vqgpt.distributed import pick_device
from vqgpt.errors import exit_on_user_error
from vqgpt.files import atomic_path
from vqgpt.images import image_grid, load_image_batch, save_png, to_uint8, to_unit_range
from vqgpt.sampling import sample_tokens
from vqgpt.shards import read_manifest
from vqgpt.trained_models import load_bound_vqgan, load_gpt, optimize_for_inference
from vqgpt.training import autocast, resolve_precision


def check_same_classes(shards: str, gpt_classes: list[str]) -> None:
    """Label k must mean the same class to the shards and to the GPT, or the completions are conditioned wrongly."""
    classes = read_manifest(shards).get("classes", [])
    if classes != gpt_classes:
        raise ConfigError(f"{shards}: its classes {classes[:6]}{'...' if len(classes) > 6 else ''} are not the GPT's "
                          f"{gpt_classes[:6]}{'...' if len(gpt_classes) > 6 else ''}; complete images of the GPT's data")


def save_tokens(path: Path, tokens: torch.Tensor) -> None:
    """(n, tokens_per_image) int64 codes in raster order, written atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:   # a file object: np.save would append .npy to tmp
        np.save(handle, tokens.cpu().numpy().astype(np.int64))


def bound_vqgan_path(cfg: SampleConfig, token_manifest: dict) -> str:
    """The VQGAN to decode with: --vqgan, else the one the tokens name ('' when that is absent)."""
    path = cfg.vqgan or token_manifest.get("vqgan_checkpoint", "")
    return path if cfg.vqgan or (path and Path(path).exists()) else ""


def main(cfg: SampleConfig) -> int:
    device = pick_device(cfg.device)
    with autocast(device, resolve_precision(cfg.precision, device)):
        return sample(cfg, device)


def sample(cfg: SampleConfig, device: torch.device) -> int:
    gpt = load_gpt(cfg.gpt, device, cfg.weights)
    config = gpt.config
    if cfg.class_ is not None and not 0 <= cfg.class_ < config.n_classes:
        raise ConfigError(f"--class {cfg.class_} outside [0, {config.n_classes}) "
                          f"(classes: {gpt.token_manifest.get('classes', [])})")
    if not cfg.complete and not bound_vqgan_path(cfg, gpt.token_manifest):
        return sample_tokens_only(cfg, gpt, device)
    vqgan = load_bound_vqgan(gpt.token_manifest, cfg.vqgan, device, tokens_name=f"the tokens of {gpt.path}")
    grid_rows, grid_width = gpt.token_manifest["latent_grid"]
    if cfg.complete and cfg.keep_rows is not None and cfg.keep_rows > grid_rows:
        raise ConfigError(f"--keep-rows {cfg.keep_rows} exceeds the {grid_rows} token rows of an image")
    gpt_model = optimize_for_inference(gpt.model, compile=cfg.compile)
    vqgan_model = optimize_for_inference(vqgan.model, compile=cfg.compile, channels_last=cfg.channels_last)
    if cfg.complete:   # read and checked before anything is written
        originals, labels = load_image_batch(cfg.complete, cfg.num_samples, vqgan.config.image_size)
        if labels is not None and config.n_classes:
            check_same_classes(cfg.complete, gpt.token_manifest.get("classes", []))
        elif cfg.cfg != 1:   # sample_tokens guides only labelled rows: the scale was ignored
            missing = f"{cfg.complete} holds no labels" if config.n_classes else "this GPT has no classes"
            raise ConfigError(f"--cfg guides each completion towards its image's class, but {missing}; leave it at 1")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    options = sampling_options(cfg, device)
    if cfg.complete:
        images = to_unit_range(torch.from_numpy(originals).to(device))
        with torch.no_grad():
            tokens = vqgan_model.encode_to_indices(images)
            reconstructions = to_uint8(vqgan_model.decode_indices(tokens))
        keep_rows = grid_rows // 2 if cfg.keep_rows is None else cfg.keep_rows
        label_tensor = torch.from_numpy(labels).to(device) if labels is not None and config.n_classes else None
        sampled = sample_tokens(gpt_model, len(originals), labels=label_tensor,
                                prefix=tokens[:, :keep_rows * grid_width], **options)
        with torch.no_grad():
            completions = to_uint8(vqgan_model.decode_indices(sampled))
        save_png(out / "completion.png", image_grid([originals, reconstructions, completions]), upscale=2)
        outputs = completions
    else:
        labels = None
        if cfg.class_ is not None:
            labels = torch.full((cfg.num_samples,), cfg.class_, device=device, dtype=torch.long)
        sampled = sample_tokens(gpt_model, cfg.num_samples, labels=labels, **options)
        with torch.no_grad():
            outputs = to_uint8(vqgan_model.decode_indices(sampled))
        save_png(out / "grid.png", image_grid([outputs[i:i + 8] for i in range(0, len(outputs), 8)]), upscale=2)
    for index, image in enumerate(outputs):
        save_png(out / f"sample_{index:03d}.png", np.ascontiguousarray(image))
    if cfg.save_tokens:
        save_tokens(out / "tokens.npy", sampled)
    print(f"{out}: {len(outputs)} image(s) from {gpt.path.name} (step {gpt.step}, {gpt.weights} weights)")
    return 0


def sampling_options(cfg: SampleConfig, device: torch.device) -> dict:
    return dict(cfg_scale=cfg.cfg, cfg_schedule=cfg.cfg_schedule, cfg_interval=cfg.cfg_interval,
                temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p if cfg.top_p < 1 else None,
                generator=torch.Generator(device=device).manual_seed(cfg.seed), use_kv_cache=cfg.kv_cache)


def sample_tokens_only(cfg: SampleConfig, gpt, device: torch.device) -> int:
    """No VQGAN to decode with: the codes go to OUT/tokens.npy, for decoding elsewhere."""
    labels = None
    if cfg.class_ is not None:
        labels = torch.full((cfg.num_samples,), cfg.class_, device=device, dtype=torch.long)
    gpt_model = optimize_for_inference(gpt.model, compile=cfg.compile)
    tokens = sample_tokens(gpt_model, cfg.num_samples, labels=labels, **sampling_options(cfg, device))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_tokens(out / "tokens.npy", tokens)
    named = gpt.token_manifest.get("vqgan_checkpoint", "")
    print(f"{out}: tokens only, {len(tokens)} grid(s) in tokens.npy from {gpt.path.name} (step {gpt.step}, "
          f"{gpt.weights} weights): the VQGAN of its tokens ({named or 'none named'}) is absent; pass --vqgan PATH "
          "to decode images")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(lambda: main(parse_config(SampleConfig, SAMPLE_PRESETS, description=__doc__)),
                                "sample"))
