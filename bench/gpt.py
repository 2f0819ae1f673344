"""Benchmark the GPT: training tokens/s and MFU, and sampling with the KV cache vs full recompute.

    taskset -c 0 python bench/gpt.py --preset g256 --batch-size 8      # one pinned thread + 2 ranks
    python bench/gpt.py --preset seed --batch-size 32 --device cuda      # bf16 on a GPU
    taskset -c 1 python bench/gpt.py --preset g256 --batch-size 8 --ranks 0 --skip-recompute \
        --variants bf16,compile,bf16-compile                            # precision and compile rows

MFU is against the machine's GEMM peak measured in the same run; the recompute sampler (the whole
prefix every step, as taming's and nanoGPT's samplers do) is the reference for the KV cache. The
--variants rows (bf16 autocast, torch.compile) time training on fresh models, with their speedup
over the first figure (fp32 eager on CPU). Last line: one JSON object.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import (add_rank_scaling, emit, gemm_peak_gflops, parse_variants, setup_worker,  # noqa: E402
                          single_process_device, training_bench_parser, variant_dtype)
from models.gpt import GPT, GPT_PRESETS  # noqa: E402
from vqgpt import distributed  # noqa: E402
from vqgpt.sampling import sample_tokens  # noqa: E402
from vqgpt.training import autocast, grad_scaler  # noqa: E402


def build(preset: str, device: torch.device, n_classes: int):
    torch.manual_seed(0)
    config = dataclasses.replace(GPT_PRESETS[preset], n_classes=n_classes)
    model = GPT(config).to(device)
    optimizer = model.configure_optimizer(0.01, 3e-4, (0.9, 0.95), device.type)
    return model, optimizer


def train_tokens_per_s(model, wrapped, optimizer, batch_size: int, steps: int, dtype, warmup: int = 1) -> float:
    config = model.config
    device = next(model.parameters()).device
    tokens = torch.randint(0, config.codebook_size, (batch_size, config.tokens_per_image), device=device)
    inputs = torch.cat([torch.full((batch_size, 1), config.start_token, device=device), tokens[:, :-1]], 1)

    scaler = grad_scaler(device, dtype)   # fp16 only

    def step():
        with autocast(device, dtype):
            _, loss = wrapped(inputs, tokens)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    for _ in range(warmup):   # (and compilation)
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * tokens.numel() / (time.perf_counter() - start)


def worker(args) -> None:
    dist = setup_worker(args.device)
    model, optimizer = build(args.preset, dist.device, 0)
    trained = model if args.independent else distributed.wrap_ddp(model, dist.device)
    rate = train_tokens_per_s(model, trained, optimizer, args.batch_size, args.steps, torch.float32)
    if dist.is_main:
        print('{"train_tokens_per_s": %f}' % (rate * dist.world_size))
    distributed.barrier()   # every rank done before gloo closes: a rank once aborted at exit under load
    distributed.cleanup()


def sampling_rate(model, batch_size: int, use_kv_cache: bool, device) -> tuple[float, float]:
    generator = torch.Generator(device=device).manual_seed(0)
    start = time.perf_counter()
    tokens = sample_tokens(model, batch_size, top_k=100, generator=generator, use_kv_cache=use_kv_cache)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return tokens.numel() / seconds, seconds


def main() -> None:
    parser = training_bench_parser(__doc__, GPT_PRESETS, "g256", default_steps=3)
    parser.add_argument("--skip-recompute", action="store_true", help="skip the slow full-recompute sampler")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    device, dtype = single_process_device(args.device)
    model, optimizer = build(args.preset, device, 0)
    config = model.config
    results = {"preset": args.preset, "batch_size": args.batch_size, "tokens_per_image": config.tokens_per_image,
               "parameters_M": model.num_params() / 1e6, "device": str(device),
               "dtype": str(dtype).replace("torch.", "")}
    results["train_tokens_per_s"] = train_tokens_per_s(model, model, optimizer, args.batch_size, args.steps, dtype)
    for variant in parse_variants(args.variants):
        fresh, fresh_optimizer = build(args.preset, device, 0)
        compiled = variant.endswith("compile")
        rate = train_tokens_per_s(fresh, torch.compile(fresh) if compiled else fresh, fresh_optimizer, args.batch_size,
                                  args.steps, variant_dtype(variant, dtype), warmup=3 if compiled else 1)
        name = variant.replace("-", "_")
        results[f"train_tokens_per_s_{name}"] = rate
        results[f"{name}_speedup"] = rate / results["train_tokens_per_s"]
    flops_per_token = model.estimate_flops_per_token()
    results["gflops_per_token"] = flops_per_token / 1e9
    peak_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    results["gemm_peak_gflops"] = gemm_peak_gflops(device, peak_dtype, 4096 if device.type == "cuda" else 1024)
    results["mfu"] = results["train_tokens_per_s"] * flops_per_token / 1e9 / results["gemm_peak_gflops"]
    with autocast(device, dtype):
        results["sample_tokens_per_s_kv"], results["sample_seconds_kv"] = sampling_rate(model, args.batch_size, True, device)
        if not args.skip_recompute:
            rate, seconds = sampling_rate(model, args.batch_size, False, device)
            results["sample_tokens_per_s_recompute"], results["sample_seconds_recompute"] = rate, seconds
            results["kv_speedup"] = results["sample_tokens_per_s_kv"] / rate
    if args.ranks > 1 and device.type == "cpu":
        add_rank_scaling(results, __file__, args, "train_tokens_per_s")
    emit(results)


if __name__ == "__main__":
    main()
