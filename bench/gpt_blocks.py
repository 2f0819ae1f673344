"""The GPT block on real tokens: GPT-2's (the `tiny` preset) beside LlamaGen's at about the same parameter count.

    python bench/gpt_blocks.py                       # clip art and photographs, seeds 0 and 1: 15-35 minutes
    python bench/gpt_blocks.py --sets photos --seeds 0 --steps 200 --out runs/gpt-blocks-try

Each set's val and train images (train with their mirror images) are quantized once by that set's
`b64` VQGAN of bench/quality.py (--vqgan-root/SET-ours: 8x8 tokens of 1024 codes). Then train_gpt.py
trains, per set and seed, the `tiny` preset with --arch gpt2 and with --arch llama, the llama one
narrower and shallower (--llama-shape) because SwiGLU and its own head cost parameters: same
steps, batch, schedule, AdamW and dropout (the `tiny` recipe, --steps cut to fit the budget).
Runs go two at a time, each pinned to its own core with one thread, a set's gpt2 and llama runs of
one seed side by side. Figures: the trainer's final eval (val loss in nats/token over the whole val
split), training tokens/s (the mean of its logged rates past the first), MFU against the fp32
GEMM peak of one thread measured in this run (before and after training), and each llama/gpt2
ratio. A rerun reuses finished runs trained as it would train them now; their MFU is then against
a peak measured later, on a shared machine another load: for figures, train every run in one
call. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
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

from bench.common import emit, gemm_peak_gflops  # noqa: E402
from bench.quality import final_eval, finished, run_pinned  # noqa: E402
from models.gpt import GPT, GPTConfig  # noqa: E402
from vqgpt.config import config_to_dict, field_defaults, parse_config  # noqa: E402
from vqgpt.runlog import METRICS_NAME, read_metrics  # noqa: E402
from vqgpt.settings import GPT_TRAIN_PRESETS, GPTTrainConfig  # noqa: E402

ARCHS = ("gpt2", "llama")
# set by the trainer from the token manifest, or paths: not a difference between two runs' training
NOT_COMPARED = ("out", "tokens", "resume", "vqgan", "codebook_size", "n_classes", "tokens_per_image")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="data/real", help="image shards of bench/realsets.py (default: data/real)")
    parser.add_argument("--vqgan-root", default="runs/quality-v5",
                        help="VQGANs of bench/quality.py, one SET-ours run per set (default: runs/quality-v5)")
    parser.add_argument("--out", default="runs/gpt-blocks", help="tokens and GPT runs (default: runs/gpt-blocks)")
    parser.add_argument("--sets", nargs="+", default=["clipart", "photos"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--preset", default="tiny", choices=sorted(GPT_TRAIN_PRESETS), help="the gpt2 side (default: tiny)")
    parser.add_argument("--llama-shape", default="3,4,112",
                        help="n_layer,n_head,n_embd of the llama side (default 3,4,112: within 3.5%% of tiny's count)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of every run (default: 300)")
    parser.add_argument("--batch-size", type=int, default=0, help="sequences a step (0: the preset's, 32 for tiny)")
    parser.add_argument("--warmup-steps", type=int, default=-1, help="(-1: the preset's, 100 for tiny)")
    parser.add_argument("--quantize-batch-size", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs at once, one core each")
    args = parser.parse_args(argv)
    args.seeds = list(dict.fromkeys(args.seeds))
    try:
        args.llama_layers, args.llama_heads, args.llama_width = (int(v) for v in args.llama_shape.split(","))
    except ValueError:
        parser.error(f"--llama-shape: three integers n_layer,n_head,n_embd, got {args.llama_shape!r}")
    return args


def trainer_flags(args, arch: str, seed: int) -> list[str]:
    """train_gpt.py flags of one side, paths left out: both sides the same but for the block and its shape."""
    flags = [f"--preset={args.preset}", f"--arch={arch}", f"--max-steps={args.steps}", f"--eval-every={args.steps}",
             f"--ckpt-every={args.steps}", "--sample-count=0", f"--seed={seed}", "--progress=false"]
    if args.batch_size:
        flags.append(f"--batch-size={args.batch_size}")
    if args.warmup_steps >= 0:
        flags.append(f"--warmup-steps={args.warmup_steps}")
    if arch == "llama":
        flags += [f"--n-layer={args.llama_layers}", f"--n-head={args.llama_heads}", f"--n-embd={args.llama_width}"]
    return flags


def reusable(run: Path, flags: list[str], steps: int) -> bool:
    """A finished run trained with these flags; one trained otherwise stops the bench."""
    if not finished(run, steps):
        return False
    wanted = config_to_dict(parse_config(GPTTrainConfig, GPT_TRAIN_PRESETS, [*flags, "--tokens=x"]))
    saved = json.loads((run / "config.json").read_text())["config"]
    defaults = field_defaults(GPTTrainConfig)
    differ = sorted(k for k, v in wanted.items() if k not in NOT_COMPARED and saved.get(k, defaults.get(k)) != v)
    if differ:
        raise SystemExit(f"gpt_blocks: {run} was trained with other settings ({', '.join(differ)}): "
                         "give another --out, or remove that run")
    return True


def quantize(vqgan: Path, data: Path, tokens: Path, batch_size: int) -> None:
    """Token shards of `data` (train with flips), pinned to one core; a rerun skips finished shards."""
    command = [sys.executable, "image_quantizer.py", f"--vqgan={vqgan}", f"--data={data}", f"--out={tokens}",
               "--flip=true", f"--batch-size={batch_size}", "--progress=false"]
    print(f"$ {shlex.join(command)}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    core = str(min(os.sched_getaffinity(0)))
    subprocess.run(["taskset", "-c", core, *command], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)


def model_of(run: Path) -> GPT:
    """The network a finished run trained (its saved config: codebook, classes and grid from the tokens)."""
    saved = json.loads((run / "config.json").read_text())["config"]
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    return GPT(GPTConfig(**{k: v for k, v in saved.items() if k in known}))


def training_rate(run: Path) -> float:
    """Mean tokens/s of the logged training intervals, the first (start-up) left out where there are more."""
    rates = [r["tokens_per_s"] for r in read_metrics(run / METRICS_NAME) if r["kind"] == "train"]
    return float(np.mean(rates[1:] if len(rates) > 1 else rates))


def pinned_gemm_peak() -> float:
    """fp32 GEMM GFLOP/s of one thread on the first core, as each run trains."""
    torch.set_num_threads(1)
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(affinity)})
    try:
        return gemm_peak_gflops(torch.device("cpu"))
    finally:
        os.sched_setaffinity(0, affinity)


def main(argv=None) -> int:
    args = parse_args(argv)
    data_root, vqgan_root, out = Path(args.data_root), Path(args.vqgan_root), Path(args.out)
    for s in args.sets:
        for needed, fix in ((data_root / s / "manifest.json", "python bench/realsets.py"),
                            (vqgan_root / f"{s}-ours" / "latest", "python bench/quality.py")):
            if not needed.is_file():
                print(f"gpt_blocks: {needed} is missing: make it with {fix}, or give --data-root / --vqgan-root",
                      file=sys.stderr)
                return 2
    for s in args.sets:
        quantize(vqgan_root / f"{s}-ours", data_root / s, out / f"{s}-tokens", args.quantize_batch_size)
    runs = {(s, seed, arch): out / f"{s}-{arch}-seed{seed}" for s in args.sets for seed in args.seeds for arch in ARCHS}
    commands = []
    for (s, seed, arch), run in runs.items():
        flags = trainer_flags(args, arch, seed)
        if not reusable(run, flags, args.steps):
            commands.append(([sys.executable, "train_gpt.py", *flags, f"--tokens={out / f'{s}-tokens'}",
                              f"--out={run}", "--resume=auto"], run / "train.log"))
    peak = pinned_gemm_peak()
    run_pinned(commands, args.jobs)
    peak = (peak + pinned_gemm_peak()) / 2   # before and after: the machine is shared

    preset = GPT_TRAIN_PRESETS[args.preset]
    results: dict = {"steps": args.steps, "batch_size": args.batch_size or preset.batch_size,
                     "warmup_steps": args.warmup_steps if args.warmup_steps >= 0 else preset.warmup_steps,
                     "lr": preset.lr, "dropout": preset.dropout, "seeds": args.seeds, "preset": args.preset,
                     "llama_shape": args.llama_shape, "gemm_peak_gflops": peak}
    for s in args.sets:
        manifest = json.loads((out / f"{s}-tokens" / "manifest.json").read_text())
        results[f"{s}_uniform_loss"] = math.log(manifest["codebook_size"])
        results[f"{s}_train_sequences"] = manifest["splits"]["train"]["count"]   # with the mirror images
        results[f"{s}_val_sequences"] = manifest["splits"]["val"]["count"]
        for arch in ARCHS:
            model = model_of(runs[(s, args.seeds[0], arch)])
            results[f"{s}_{arch}_parameters"] = model.num_params()
            flops_per_token = model.estimate_flops_per_token()
            per_seed = {"val_loss": [], "tokens_per_s": [], "mfu": []}
            for seed in args.seeds:
                run = runs[(s, seed, arch)]
                evaluation = final_eval(run)
                assert evaluation["step"] == args.steps, run
                rate = training_rate(run)
                per_seed["val_loss"].append(evaluation["val_loss"])
                per_seed["tokens_per_s"].append(rate)
                per_seed["mfu"].append(rate * flops_per_token / 1e9 / peak)
            for key, values in per_seed.items():
                results[f"{s}_{arch}_{key}"] = float(np.mean(values))
                results[f"{s}_{arch}_{key}_per_seed"] = [round(v, 4) for v in values]
        results[f"{s}_parameters_llama_vs_gpt2"] = results[f"{s}_llama_parameters"] / results[f"{s}_gpt2_parameters"]
        for key in ("val_loss", "tokens_per_s", "mfu"):
            results[f"{s}_{key}_llama_vs_gpt2"] = results[f"{s}_llama_{key}"] / results[f"{s}_gpt2_{key}"]
        # a seed's llama minus gpt2 (same data order seed); negative: llama is better
        gaps = [a - b for a, b in zip(results[f"{s}_llama_val_loss_per_seed"], results[f"{s}_gpt2_val_loss_per_seed"])]
        results[f"{s}_val_loss_gap_per_seed"] = [round(g, 4) for g in gaps]
    emit(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
