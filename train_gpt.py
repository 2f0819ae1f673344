"""Train the GPT on token shards (class-conditional when the shards carry labels).

    python train_gpt.py --tokens data/shapes-tokens --out runs/gpt --preset tiny
    python train_gpt.py --tokens data/imgs-tokens --out runs/gpt-ft --init-from runs/llamagen-gpt-b   # fine-tune
    torchrun --standalone --nproc_per_node=8 train_gpt.py --tokens data/imgs-tokens --out runs/gpt --preset seed
    torchrun --nnodes=2 --node_rank=0 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --nproc_per_node=8 \
        train_gpt.py --tokens data/imgs-tokens --out runs/gpt --preset seed        # (node_rank=1 on the other)
    torchrun --standalone --nproc_per_node=8 train_gpt.py --tokens data/imgs-tokens --out runs/gpt-xl \
        --preset llamagen-XL --fsdp        # parameters, gradients and optimizer state sharded over the GPUs

Rerunning the same command continues from the latest checkpoint (--resume auto). SIGTERM or
Ctrl-C writes a checkpoint and exits 0. Each eval writes the val loss and a sample grid decoded
by the VQGAN the token manifest names (of the weight EMA under --ema-decay). `--help` lists every setting.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from pathlib import Path

import torch

from models.gpt import GPT, GPTConfig
from vqgpt import distributed, fsdp
from vqgpt.config import parse_config, subconfig
from vqgpt.ema import WeightEMA, ema_key
from vqgpt.settings import GPT_TRAIN_PRESETS, GPTTrainConfig
from vqgpt.errors import RunError, exit_on_user_error
from vqgpt.fid import check_reference_path, load_inception, reference_statistics, sample_fid, token_source_shards
from vqgpt.finetune import (GPT_TRAINING_FIELDS, GPTInitSource, adopt_gpt_architecture, check_fits_tokens,
                            launch_trainer, load_gpt_init_source)
from vqgpt.gpt_training import gpt_loss, sample_grid, validation_loss
from vqgpt.images import save_png
from vqgpt.runlog import RunLog
from vqgpt.schedule import set_lr, warmup_cosine
from vqgpt.shards import ShardLoader, ShardSplit
from vqgpt.trained_models import load_bound_vqgan
from vqgpt.training import (TrainingRun, configure_backends, grad_scaler, resolve_precision,
                            seed_everything, summary_line)


ARCHITECTURE_FIELDS = tuple(f.name for f in dataclasses.fields(GPTConfig) if f.name not in GPT_TRAINING_FIELDS)


def fit_to_tokens(cfg: GPTTrainConfig) -> tuple[GPTTrainConfig, ShardSplit, ShardSplit | None]:
    """Open the token shards and take codebook size, grid length and classes from their manifest."""
    # token shards are small (2 bytes a code): every start checks their sha256, then trusts the recorded id ranges
    train_split = ShardSplit(cfg.tokens, "train", verify_hashes=True)
    manifest = train_split.manifest
    if manifest.get("kind") != "tokens":
        raise RunError(f"{cfg.tokens}: holds {manifest.get('kind')} shards; the GPT trains on token shards "
                       "(make them with image_quantizer.py)")
    missing = [key for key in ("codebook_size", "latent_grid") if key not in manifest]
    if missing:   # checked now, not at the first eval hours later
        raise RunError(f"{cfg.tokens}: token manifest lacks {', '.join(missing)}; re-make it with image_quantizer.py")
    codebook_size = manifest["codebook_size"]
    if cfg.codebook_size not in (0, codebook_size):   # a larger vocabulary could sample ids the VQGAN cannot decode
        raise RunError(f"{cfg.tokens}: the tokens have {codebook_size} codes but --codebook-size is {cfg.codebook_size}; "
                       f"pass --codebook-size 0 (the default: the tokens' size)")
    cfg = dataclasses.replace(cfg, codebook_size=cfg.codebook_size or codebook_size, n_classes=len(train_split.classes),
                              tokens_per_image=train_split.item_shape[0])
    has_val = manifest["splits"].get("val", {}).get("count", 0) > 0
    return cfg, train_split, ShardSplit(cfg.tokens, "val", verify_hashes=True) if has_val else None


def main(cfg: GPTTrainConfig) -> int:
    return launch_trainer(train, cfg, load_gpt_init_source, adopt_gpt_architecture)


def train(cfg: GPTTrainConfig, dist: distributed.DistInfo, init: GPTInitSource | None = None) -> int:
    device = dist.device
    configure_backends(device)
    dtype = resolve_precision(cfg.precision, device)
    cfg, train_split, val_split = fit_to_tokens(cfg)
    if init is not None:
        check_fits_tokens(cfg, init)
    inception = load_inception(cfg.inception_weights, device) if cfg.eval_fid else None   # missing weights stop here
    fid_ref = ""   # --eval-fid's reference: --fid-ref, else the train images the tokens were made from
    if cfg.eval_fid:
        if cfg.fid_ref:
            check_reference_path(cfg.fid_ref)
        fid_ref = cfg.fid_ref or token_source_shards(train_split.manifest, cfg.tokens)
    fid_reference = None   # its statistics, made at the first eval by every rank (and cached beside shards)
    run = TrainingRun(cfg, dist, "gpt", ARCHITECTURE_FIELDS + ("seed",))   # the seed draws the data order
    resume = run.load_resume_state()
    vqgan = None
    if (cfg.sample_count > 0 or cfg.eval_fid) and dist.is_main:
        vqgan = load_bound_vqgan(train_split.manifest, cfg.vqgan, device, tokens_name=cfg.tokens)

    seed_everything(cfg.seed)   # identical init on every rank
    model = GPT(subconfig(GPTConfig, cfg)).to(device)
    if resume is None and init is not None:   # a fine-tune: the source's weights, fresh optimizer, step 0
        model.load_state_dict(init.gpt)
    sharded = cfg.fsdp and dist.is_distributed   # one process has nothing to shard over
    if sharded:
        fsdp.shard_gpt(model)
    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.lr, (0.9, cfg.beta2), device.type)
    scaler = grad_scaler(device, dtype)   # fp16 only
    loader = ShardLoader(train_split, cfg.batch_size, rank=dist.rank, world_size=dist.world_size, seed=cfg.seed,
                         device=device, prefetch=cfg.prefetch, grad_accum=cfg.grad_accum)
    if sharded:   # checkpoints hold the full states, gathered to rank 0
        run.track({"gpt": fsdp.FullStateModel(model)}, optimizer=fsdp.FullStateOptimizer(model, optimizer),
                  scaler=scaler, loader=loader)
    else:
        run.track({"gpt": model}, optimizer=optimizer, scaler=scaler, loader=loader)
    step = 0
    seed_everything(cfg.seed + 7919 * dist.rank)   # per-rank streams (label dropout) from here on
    if resume is not None:
        step = run.restore(resume)
    make_average = functools.partial(fsdp.sharded_copy, model, lambda: GPT(model.config)) if sharded else None
    ema = WeightEMA.start(model, cfg.weight_ema_decay, resume, ema_key("gpt"), make_average)
    if ema is not None:   # in every checkpoint; checked like the GPT
        run.networks[ema_key("gpt")] = fsdp.FullStateModel(ema.model) if sharded else ema.model
    eval_model = model if ema is None else ema.model
    wrapped: torch.nn.Module = model
    if dist.is_distributed and not sharded:
        wrapped = distributed.wrap_ddp(model, device)
    if cfg.compile:
        wrapped = torch.compile(wrapped)

    run.write_config({"token_shards": str(Path(cfg.tokens).resolve()),
                      "vqgan_sha256": train_split.manifest.get("vqgan_sha256")})
    log = RunLog(cfg.out, dist.is_main, cfg.max_steps, step, "gpt", cfg.progress, cfg.log_every,
                 cfg.wandb)
    log.print(run.describe())
    tokens_per_step = cfg.batch_size * dist.world_size * cfg.grad_accum * cfg.tokens_per_image
    log.print(f"gpt {model.num_params() / 1e6:.2f}M parameters, {cfg.tokens_per_image} tokens per image, "
              f"codebook {cfg.codebook_size}, {cfg.n_classes} classes, {dist.world_size} rank(s) on {device.type}, "
              f"{str(dtype).replace('torch.', '')}, {tokens_per_step} tokens per step" + (", FSDP" if sharded else "")
              + (f"; resumed from {resume['path']} at step {step}" if resume else ""))
    run.install_signal_handlers()

    stop = False
    tokens_seen, clock = 0, time.perf_counter()
    while step < cfg.max_steps and not stop:
        lr = warmup_cosine(step, cfg.max_steps, cfg.warmup_steps, cfg.lr, cfg.min_lr_ratio)
        set_lr(optimizer, lr)
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            batch = next(loader)
            tokens = batch.items.to(device, non_blocking=True).long()
            with distributed.no_sync(wrapped, micro < cfg.grad_accum - 1):
                loss = gpt_loss(wrapped, model, tokens, batch.labels, cfg.label_dropout, dtype)
                scaler.scale(loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float() / cfg.grad_accum
            tokens_seen += tokens.numel() * dist.world_size
        clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        scaler.unscale_(optimizer)   # a no-op unless fp16; an fp16 overflow makes the step non-finite: skipped
        grad_norm = fsdp.replicated_value(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
        stop, skip = run.end_of_step_consensus(bool(torch.isfinite(loss_sum) and torch.isfinite(grad_norm)), step)
        if not skip:
            scaler.step(optimizer)
            if ema is not None:
                ema.update()
        scaler.update()   # after an overflow: a smaller scale
        optimizer.zero_grad(set_to_none=True)
        step += 1

        log.advance({"loss": loss_sum, "lr": lr})
        if run.is_due(step, cfg.log_every):
            elapsed = time.perf_counter() - clock
            log.log(step, "train", {"loss": loss_sum.item(), "grad_norm": grad_norm.item(), "lr": lr,
                                    "tokens_per_s": tokens_seen / max(elapsed, 1e-9), "epoch": loader.epoch,
                                    "skipped_steps": run.skipped_steps})
            tokens_seen, clock = 0, time.perf_counter()
        # saved before the eval: an eval that fails must not cost the steps since the last checkpoint
        run.checkpoint_if_due(step, stop, log, token_manifest=train_split.manifest)
        if run.is_due(step, cfg.eval_every):
            if inception is not None and fid_reference is None:   # every rank extracts a share; rank 0 gets the result
                fid_reference = reference_statistics(fid_ref, "train", inception, cfg.eval_batch_size, rank=dist.rank,
                                                     world_size=dist.world_size)
            # with an EMA the trained weights' val loss is logged too: early on the average still holds the init
            raw_model = model if ema is not None and val_split is not None else None
            if sharded:   # every rank takes part in gathering rank 0's plain copies
                eval_model = fsdp.gathered_copy(model if ema is None else ema.model, lambda: GPT(model.config))
                if raw_model is not None:
                    raw_model = fsdp.gathered_copy(model, lambda: GPT(model.config))
            if dist.is_main:
                metrics = {}
                if val_split is not None:
                    metrics["val_loss"] = validation_loss(eval_model, val_split, cfg.eval_batch_size, device, dtype)
                if raw_model is not None:
                    metrics["val_loss_raw"] = validation_loss(raw_model, val_split, cfg.eval_batch_size, device, dtype)
                if inception is not None:
                    metrics.update(sample_fid(eval_model, vqgan.model, cfg.eval_fid_samples, fid_reference.stats, inception,
                                              seed=cfg.seed, batch_size=cfg.eval_batch_size, dtype=dtype,
                                              temperature=cfg.sample_temperature, top_k=cfg.sample_top_k or None))
                if vqgan is not None and cfg.sample_count > 0:
                    grid = sample_grid(eval_model, vqgan.model, cfg.sample_count,
                                       tuple(train_split.manifest["latent_grid"]),
                                       seed=cfg.seed + step, temperature=cfg.sample_temperature,
                                       top_k=cfg.sample_top_k, device=device)
                    grid_path = Path(cfg.out) / "samples" / f"samples_{step:08d}.png"
                    grid_path.parent.mkdir(parents=True, exist_ok=True)
                    save_png(grid_path, grid, upscale=max(1, 128 // vqgan.config.image_size))
                if metrics:
                    log.log(step, "eval", metrics)
                    log.print(f"step {step} eval {summary_line(metrics)}")
            if sharded:
                eval_model = raw_model = None   # the full copies are not kept through training
            distributed.barrier()
    return run.finish(loader, log)


if __name__ == "__main__":
    sys.exit(exit_on_user_error(
        lambda: main(parse_config(GPTTrainConfig, GPT_TRAIN_PRESETS, description=__doc__)), "train_gpt"))
