"""Shared bench helpers: machine peaks measured in the same run, timing, JSON output."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def gemm_peak_gflops(device: torch.device, dtype=torch.float32, size: int = 1024) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def run():
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
    seconds = timed(run, repeats=7, warmup=2)
    return 2 * size ** 3 / seconds / 1e9


def conv3x3_peak_gflops(device: torch.device, dtype=torch.float32, channels: int = 128, size: int = 32,
                        batch: int = 8) -> float:
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(device, dtype)
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype)

    @torch.no_grad()
    def run():
        conv(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    seconds = timed(run, repeats=7, warmup=2)
    return 2 * batch * channels * channels * 9 * size * size / seconds / 1e9


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def spawn_torchrun(script: str, nproc: int, args: list[str]) -> dict:
    """Run this bench under torchrun and return rank 0's JSON line."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               script, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    finished = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if finished.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({finished.returncode}):\n{finished.stderr[-3000:]}")
    output = finished.stdout
    return json.loads([line for line in output.splitlines() if line.startswith("{")][-1])


def training_bench_parser(doc: str, presets, default_preset: str, default_steps: int) -> argparse.ArgumentParser:
    """The flags every training bench takes, plus the hidden ones of its torchrun workers."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=default_preset, choices=sorted(presets))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=default_steps)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ranks", type=int, default=2, help="also time this many ranks under torchrun (0: skip)")
    parser.add_argument("--variants", default="bf16",
                        help=f"comma-separated rows beside fp32 eager (CPU) or bf16 eager (CUDA): {', '.join(VARIANTS)}; "
                             "compile rows take a minute or more to compile on a CPU")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--independent", action="store_true", help=argparse.SUPPRESS)   # worker without DDP
    return parser


VARIANTS = ("compile", "bf16", "bf16-compile", "fp16")


def parse_variants(text: str) -> list[str]:
    """--variants: rows timed beside the single-process figure, each on fresh models with the same seed."""
    variants = [v for v in text.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    return variants


def variant_dtype(variant: str, base: torch.dtype) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(variant.split("-")[0], base)


def single_process_device(device_name: str) -> tuple[torch.device, torch.dtype]:
    """The single-process figure's device and dtype: one thread on CPU (fp32), bf16 autocast on CUDA."""
    from vqgpt.training import resolve_precision

    device = torch.device(device_name)
    if device.type == "cpu":
        torch.set_num_threads(1)
    return device, resolve_precision("auto", device)


def setup_worker(device: str):
    """One rank under torchrun, pinned to its own core with one thread, like the single-process figure."""
    from vqgpt import distributed

    dist = distributed.setup(device)
    os.sched_setaffinity(0, {dist.local_rank % os.cpu_count()})
    torch.set_num_threads(1)
    return dist


def add_rank_scaling(results: dict, script: str, args: argparse.Namespace, rate_key: str) -> None:
    """Time `ranks` processes of this bench under torchrun; record their rate and the scaling over one.

    The same processes are timed again without DDP (each trains alone, no all-reduce): their
    scaling is what the machine's shared memory bandwidth and caches allow, the ceiling for DDP.
    """
    ranks = args.ranks
    worker_args = ["--preset", args.preset, "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    multi = spawn_torchrun(script, ranks, ["--worker", *worker_args])
    results[f"{rate_key}_{ranks}_ranks"] = multi[rate_key]
    results[f"scaling_{ranks}_ranks"] = multi[rate_key] / results[rate_key]
    alone = spawn_torchrun(script, ranks, ["--worker", "--independent", *worker_args])
    results[f"scaling_{ranks}_ranks_without_allreduce"] = alone[rate_key] / results[rate_key]


def emit(results: dict) -> None:
    for key, value in results.items():
        print(f"{key:42s} {value:12.4g}" if isinstance(value, float) else f"{key:42s} {value}")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}))
