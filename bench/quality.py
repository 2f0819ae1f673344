"""Reconstruction quality on real images at a fixed budget: our preset beside taming's configuration.

    python bench/realsets.py                 # once: builds data/real/{clipart,photos}
    python bench/quality.py                  # about 30 minutes on 2 cores
    python bench/quality.py --sets photos --ours-flags="--lr 3e-4" --out runs/quality-try
    python bench/quality.py --seeds 0 1      # each run twice; figures are means, per-seed values beside them

Each VQGAN trains for `--steps` x `--batch-size` images on one pinned thread (runs go two at a time,
one per core), then the trainer's own evaluation measures the WHOLE val split: PSNR, SSIM, L1,
codebook usage and perplexity (with several --seeds: their mean, targets checked on it; single
photograph runs have spread over 2.6 dB in four seeds). Colour (bench/colour.py, as BENCHMARKS' colour
tables define it) on the FIRST `--colour-images` (200) val images of each set, the images those tables
used, not the whole split, for every run and seed: `chroma_ratio` (std of the reconstructions' chroma,
pixel minus its grey level, over the originals'), `chroma_error` (the chroma part of the squared error,
[-1, 1] units; `grey_chroma_error` is what a grey answer scores). For each run of the first seed,
where it carries colour: a ridge probe from each encoder level (`probe_r2_levels`, the encoder's
order) and from the quantized latent (`probe_r2_lookup`), pooled to the token grid, to each token
patch's mean chroma, fitted on the first `--probe-train` (500) train images and scored (R^2) on those
val images (runs 97-106 fitted on 150 val images and scored on 150 others). About half a minute a
run on 2 cores, a minute with the probe. The reference is the `taming-b64` preset
(taming-transformers' configuration: plain VQ, uniform init, its loss form and learning-rate rule)
trained in the same run on the same data. Then a GPT learns the clip-art tokens of our VQGAN for
`--gpt-steps` steps (val loss in nats/token, blind samples). Figures land in OUT/figures; the last line
printed is one JSON object. A rerun reuses the finished runs in OUT that were trained with the
settings it would give them now, and stops at one trained otherwise (give another --out). Both
sides add LPIPS to their pixel loss when vgg16-397923af.pth is in the torch hub cache, and train on
the pixel loss alone offline (said in the JSON): LPIPS on a random VGG backbone measures no
perception and cost our preset 0.9 dB val PSNR on the photographs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.colour import (chroma, chroma_error, chroma_std_ratio, encoder_features, grey_chroma_error,  # noqa: E402
                          probe_features)
from bench.common import emit  # noqa: E402
from models.perceptual import find_vgg_weights  # noqa: E402
from vqgpt.config import check_removed_settings, config_to_dict, field_defaults, parse_config  # noqa: E402
from vqgpt.errors import ConfigError  # noqa: E402
from vqgpt.settings import VQGAN_TRAIN_PRESETS, VQGANTrainConfig  # noqa: E402
from vqgpt.images import image_grid, save_png, to_uint8, to_unit_range  # noqa: E402
from vqgpt.files import atomic_write_bytes  # noqa: E402
from vqgpt.runlog import METRICS_NAME, read_metrics  # noqa: E402
from vqgpt.shards import ShardSplit  # noqa: E402
from vqgpt.trained_models import load_vqgan  # noqa: E402

TARGETS = {"codebook_usage": 0.9, "clipart_psnr": 18.0, "clipart_ssim": 0.6,
           "photos_psnr_gain": 2.5, "photos_ssim_gain": 0.1}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/real", help="folder made by bench/realsets.py (default: data/real)")
    parser.add_argument("--out", default="runs/quality", help="runs and figures (default: runs/quality)")
    parser.add_argument("--sets", nargs="+", default=["clipart", "photos"], choices=["clipart", "photos"])
    parser.add_argument("--steps", type=int, default=271, help="VQGAN optimizer steps (default: 271)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ours", default="b64", help="our preset (default: b64; 'none' skips)")
    parser.add_argument("--ours-flags", default="", help="extra trainer flags for our runs, e.g. '--lr 3e-4'")
    parser.add_argument("--reference", default="taming-b64", help="reference preset (default: taming-b64; 'none' skips)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="train every run once per seed (default: 0); grids and the GPT use the first")
    parser.add_argument("--gpt-steps", type=int, default=2000, help="GPT steps on the clip-art tokens (0: skip)")
    parser.add_argument("--colour-images", type=int, default=200,
                        help="first val images of each set for the colour figures and the probe's score (default: 200)")
    parser.add_argument("--probe-train", type=int, default=500,
                        help="first train images of each set the colour probe is fitted on (default: 500; 0 skips it)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs at once, one core each")
    args = parser.parse_args(argv)
    if args.colour_images < 1 or args.probe_train < 0:
        parser.error("--colour-images must be at least 1 and --probe-train at least 0")
    args.seeds = list(dict.fromkeys(args.seeds))   # a seed named twice is one run, counted once in the means
    return args


def finished(run: Path, steps: int) -> bool:
    latest = run / "latest"
    return latest.is_file() and latest.read_text().strip() == f"step_{steps:08d}.pt"


# where a finished run may differ from the command that would train it now
PATH_SETTINGS = ("out", "data", "resume")


def reusable(run: Path, command: list[str], steps: int) -> bool:
    """True for a finished run trained with the settings `command` gives now; a finished run trained otherwise
    (another preset definition, flag or seed) stops the bench instead of being reported as this configuration.
    A setting the run does not record did not exist then and must be at its default now."""
    if not finished(run, steps):
        return False
    wanted = config_to_dict(parse_config(VQGANTrainConfig, VQGAN_TRAIN_PRESETS, command[2:]))
    config_path = run / "config.json"
    if not config_path.is_file():   # the trainer writes it first: a run copied in by hand, or damaged
        raise SystemExit(f"quality: {run} holds a finished run without its config.json, so what it measured is "
                         "unknown: give another --out, or remove that run")
    saved = json.loads(config_path.read_text())["config"]
    try:
        check_removed_settings(saved, str(run))
    except ConfigError as err:
        raise SystemExit(f"quality: {err}: give another --out, or remove that run") from None
    defaults = field_defaults(VQGANTrainConfig)
    differ = sorted(key for key, value in wanted.items() if key not in PATH_SETTINGS
                    and saved.get(key, defaults.get(key)) != value)
    if differ:
        raise SystemExit(f"quality: {run} holds a finished run trained with other settings ({', '.join(differ)}): "
                         "give another --out, or remove that run")
    return True


def final_eval(run: Path) -> dict:
    return [record for record in read_metrics(run / METRICS_NAME) if record["kind"] == "eval"][-1]


def run_folder(out: Path, data_set: str, side: str, seed: int) -> Path:
    """Seed 0 keeps the plain name, so runs of a one-seed bench are reused by a several-seed one."""
    return out / (f"{data_set}-{side}" if seed == 0 else f"{data_set}-{side}-seed{seed}")


def run_pinned(commands: list[tuple[list[str], Path]], jobs: int) -> None:
    """Run the commands `jobs` at a time, each pinned to its own core with one thread; logs beside each run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cores = sorted(os.sched_getaffinity(0))
    pending = list(commands)
    running: list[tuple[subprocess.Popen, Path, int]] = []
    while pending or running:
        free = [c for c in cores[:jobs] if c not in {core for _, _, core in running}]
        while pending and free:
            command, log_path = pending.pop(0)
            core = free.pop(0)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            print(f"[core {core}] {shlex.join(command)}", flush=True)
            process = subprocess.Popen(["taskset", "-c", str(core), *command], cwd=ROOT, env=env,
                                       stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
            running.append((process, log_path, core))
        process, log_path, core = running.pop(0)
        if process.wait() != 0:
            raise SystemExit(f"failed ({process.returncode}); see {log_path}:\n"
                             + "\n".join(log_path.read_text().splitlines()[-5:]))


def vqgan_command(preset: str, data: Path, run: Path, seed: int, args, extra: list[str],
                  lpips_flags: list[str]) -> list[str]:
    return [sys.executable, "train_resnet_vqgan.py", f"--preset={preset}", f"--data={data}", f"--out={run}",
            f"--max-steps={args.steps}", f"--batch-size={args.batch_size}", "--eval-every=0",
            f"--ckpt-every={args.steps}", "--eval-batch-size=100", f"--seed={seed}", *lpips_flags, *extra]


@torch.no_grad()
def comparison_grid(runs: dict[str, Path], data: Path, path: Path, count: int = 16) -> None:
    """Val originals, then each run's reconstructions of them (rows in the order of `runs`)."""
    split = ShardSplit(data, "val")
    picks = np.linspace(0, len(split) - 1, count).astype(int)
    originals, _ = split.read(picks)
    rows = [originals]
    for run in runs.values():
        vqgan = load_vqgan(run).model
        recon, _, _, _ = vqgan(to_unit_range(torch.from_numpy(originals)))
        rows.append(to_uint8(recon.clamp(-1, 1)))
    save_png(path, image_grid(rows), upscale=2)


def first_images(data: Path, split: str, count: int) -> np.ndarray:
    """The first `count` images of a split (all of it when shorter), uint8 (N, H, W, 3)."""
    images = ShardSplit(data, split)
    return images.read(np.arange(min(count, len(images))))[0]


def colour_figures(run: Path, val_images: np.ndarray, train_images: np.ndarray | None) -> dict:
    """A run's chroma ratio and chroma error on `val_images`, and, given `train_images`, the colour probe's
    R^2 per encoder level and of the quantized latent (fitted on the train images, scored on the val ones)."""
    vqgan = load_vqgan(run).model
    score = encoder_features(vqgan, val_images, keep_recon=True)
    figures = {"chroma_ratio": chroma_std_ratio(val_images, score.recon),
               "chroma_error": chroma_error(val_images, score.recon)}
    if train_images is not None:
        fit = encoder_features(vqgan, train_images)
        figures.update(probe_features(fit, train_images, score, val_images, vqgan.latent_grid))
    return figures


def json_number(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 4)


def add_colour_figures(results: dict, seeded_runs: dict, data: Path, args) -> None:
    """Colour figures of every run (means over seeds, per-seed values beside them) and the probe of the first seed's."""
    for s in args.sets:
        # the first --colour-images val images (200: those of BENCHMARKS' colour tables), not the whole val split
        val_images = first_images(data / s, "val", args.colour_images)
        train_images = first_images(data / s, "train", args.probe_train) if args.probe_train > 0 else None
        results[f"{s}_colour_val_images"] = len(val_images)
        results[f"{s}_val_chroma_std"] = float(chroma(val_images).std())
        results[f"{s}_grey_chroma_error"] = grey_chroma_error(val_images)
        if train_images is not None:
            results[f"{s}_probe_train_images"] = len(train_images)
        for side in dict.fromkeys(side for (set_name, side, _) in seeded_runs if set_name == s):
            per_seed = [colour_figures(seeded_runs[(s, side, seed)], val_images,
                                       train_images if seed == args.seeds[0] else None) for seed in args.seeds]
            for key in ("chroma_ratio", "chroma_error"):
                values = [figures[key] for figures in per_seed]
                results[f"{s}_{side}_{key}"] = float(np.mean(values))
                if len(values) > 1:
                    results[f"{s}_{side}_{key}_per_seed"] = [round(v, 4) for v in values]
            if train_images is not None:
                results[f"{s}_{side}_probe_r2_levels"] = [json_number(r2) for r2 in per_seed[0]["levels"]]
                results[f"{s}_{side}_probe_r2_lookup"] = json_number(per_seed[0]["lookup"])


def gpt_stage(our_run: Path, data: Path, out: Path, steps: int, results: dict) -> None:
    tokens, gpt_run, samples = out / "clipart-tokens", out / "clipart-gpt", out / "clipart-samples"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def call(*command: str) -> None:
        print(f"$ {shlex.join(command)}", flush=True)
        subprocess.run([sys.executable, *command], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    call("image_quantizer.py", f"--vqgan={our_run}", f"--data={data}", f"--out={tokens}", "--flip")
    if not finished(gpt_run, steps):
        call("train_gpt.py", "--preset=tiny", f"--tokens={tokens}", f"--out={gpt_run}", f"--max-steps={steps}",
             f"--eval-every={steps}", f"--ckpt-every={steps}", "--sample-count=0")
    call("sample.py", f"--gpt={gpt_run}", "--n=32", f"--out={samples}", "--top-k=100")
    manifest = json.loads((tokens / "manifest.json").read_text())
    results["gpt_val_loss"] = final_eval(gpt_run)["val_loss"]
    results["gpt_uniform_loss"] = math.log(manifest["codebook_size"])
    results["gpt_steps"] = steps


def main(argv=None) -> int:
    args = parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    missing = [s for s in args.sets if not (data / s / "manifest.json").is_file()]
    if missing:
        print(f"quality: {data}/{missing[0]} is missing: build the sets with python bench/realsets.py --out {data}",
              file=sys.stderr)
        return 2
    lpips_flags = [] if find_vgg_weights(None) else ["--perceptual-weight=0"]
    sides = {}
    if args.ours != "none":
        sides["ours"] = (args.ours, shlex.split(args.ours_flags))
    if args.reference != "none":
        sides["taming"] = (args.reference, [])
    seeded_runs = {(s, side, seed): run_folder(out, s, side, seed)
                   for seed in args.seeds for s in args.sets for side in sides}
    commands = [(vqgan_command(sides[side][0], data / s, run, seed, args, sides[side][1], lpips_flags),
                 run / "train.log") for (s, side, seed), run in seeded_runs.items()]
    commands = [(command, log) for command, log in commands if not reusable(log.parent, command, args.steps)]
    run_pinned(commands, args.jobs)
    runs = {(s, side): run for (s, side, seed), run in seeded_runs.items() if seed == args.seeds[0]}

    results: dict = {"steps": args.steps, "batch_size": args.batch_size, "seeds": args.seeds, "ours": args.ours,
                     "ours_flags": args.ours_flags, "reference": args.reference,
                     "perceptual_loss": "off (no VGG16 weights)" if lpips_flags else "LPIPS, pretrained VGG16"}
    for s, side in runs:
        evals = [final_eval(seeded_runs[(s, side, seed)]) for seed in args.seeds]
        for key in ("psnr", "ssim", "l1", "codebook_usage", "perplexity", "codes_used"):
            values = [metrics[key] for metrics in evals]
            results[f"{s}_{side}_{key}"] = float(np.mean(values))
            if len(values) > 1:
                results[f"{s}_{side}_{key}_per_seed"] = values
        results[f"{s}_val_images"] = evals[0]["val_images"]
    add_colour_figures(results, seeded_runs, data, args)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for s in args.sets:
        comparison_grid({side: runs[(s, side)] for side in ("taming", "ours") if (s, side) in runs},
                        data / s, figures / f"{s}_recon.png")
    if "taming" in sides:
        for s in args.sets:
            for key in ("psnr", "ssim"):
                results[f"{s}_{key}_gain"] = results[f"{s}_ours_{key}"] - results[f"{s}_taming_{key}"]
    if "ours" not in sides:
        emit(results)
        return 0
    checks = {f"{s}_usage": results[f"{s}_ours_codebook_usage"] >= TARGETS["codebook_usage"] for s in args.sets}
    if "clipart" in args.sets:
        checks["clipart_psnr"] = results["clipart_ours_psnr"] >= TARGETS["clipart_psnr"]
        checks["clipart_ssim"] = results["clipart_ours_ssim"] >= TARGETS["clipart_ssim"]
    if "photos" in args.sets and "taming" in sides:
        checks["photos_psnr_gain"] = results["photos_psnr_gain"] >= TARGETS["photos_psnr_gain"]
        checks["photos_ssim_gain"] = results["photos_ssim_gain"] >= TARGETS["photos_ssim_gain"]
    results["targets_met"] = all(checks.values())
    results["targets_missed"] = sorted(k for k, ok in checks.items() if not ok)

    if args.gpt_steps > 0 and "clipart" in args.sets:
        gpt_stage(runs[("clipart", "ours")], data / "clipart", out, args.gpt_steps, results)
        grid = out / "clipart-samples" / "grid.png"
        atomic_write_bytes(figures / "clipart_gpt_samples.png", grid.read_bytes())
    print(f"figures in {figures}")
    emit(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
