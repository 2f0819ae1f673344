"""Train the VQGAN (ResNet encoder/decoder, vector quantizer, PatchGAN, LPIPS) on image shards.

    python train_resnet_vqgan.py --data data/shapes --out runs/vqgan --preset tiny --lpips-random-backbone true
    torchrun --standalone --nproc_per_node=8 train_resnet_vqgan.py --data data/imgs --out runs/vq --preset seed
    torchrun --nnodes=2 --node_rank=0 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --nproc_per_node=8 \
        train_resnet_vqgan.py --data data/imgs --out runs/vq --preset seed       # (node_rank=1 on the other)
    python train_resnet_vqgan.py --data data/imgs --out runs/vq-ft --init-from runs/taming-f16   # fine-tune

Rerunning the same command continues from the latest checkpoint (--resume auto). SIGTERM or
Ctrl-C writes a checkpoint and exits 0. Evals score the weight EMA under --ema-decay. `--help` lists
every setting.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

import torch

from models.discriminator import NLayerDiscriminator
from models.perceptual import build_lpips
from models.vqgan import VQGAN, VQGANConfig, count_parameters
from vqgpt import distributed
from vqgpt.config import parse_config, subconfig
from vqgpt.ema import WeightEMA, ema_key
from vqgpt.settings import VQGAN_TRAIN_PRESETS, VQGANTrainConfig
from vqgpt.errors import RunError, exit_on_user_error
from vqgpt.fid import check_reference_path, load_inception, reference_statistics
from vqgpt.finetune import InitSource, adopt_architecture, launch_trainer, load_init_source
from vqgpt.images import image_grid, save_png, to_unit_range
from vqgpt.optim import adam, vqgan_optimizer
from vqgpt.runlog import RunLog
from vqgpt.schedule import set_lr, warmup_cosine
from vqgpt.shards import ShardLoader, ShardSplit
from vqgpt.training import (TrainingRun, configure_backends, grad_scaler, resolve_precision,
                            seed_everything, summary_line)
from vqgpt.vqgan_step import (VQGANModels, after_optimizer_step, discriminator_backward, evaluate, generator_backward,
                              state_changed_by_forward)

ARCHITECTURE_FIELDS = tuple(f.name for f in dataclasses.fields(VQGANConfig))


def build_perceptual(cfg: VQGANTrainConfig) -> torch.nn.Module | None:
    if cfg.perceptual_weight <= 0:
        return None
    return build_lpips(cfg.lpips_weights or None, random_backbone=cfg.lpips_random_backbone)


def load_splits(cfg: VQGANTrainConfig) -> tuple[ShardSplit, ShardSplit | None]:
    train_split = ShardSplit(cfg.data, "train", verify_hashes=cfg.verify)
    if train_split.manifest.get("kind") != "images":
        raise RunError(f"{cfg.data}: holds {train_split.manifest.get('kind')} shards; the VQGAN trains on image shards")
    size = train_split.item_shape[0]
    if size != cfg.image_size:
        raise RunError(f"{cfg.data}: images are {size}x{size} but the config takes {cfg.image_size}x{cfg.image_size}; "
                       f"pass --image-size {size} (a multiple of {2 ** (len(cfg.ch_mult) - 1)}) or re-shard with --size {cfg.image_size}")
    has_val = "val" in train_split.manifest["splits"] and train_split.manifest["splits"]["val"]["count"] > 0
    return train_split, ShardSplit(cfg.data, "val", verify_hashes=cfg.verify) if has_val else None


def main(cfg: VQGANTrainConfig) -> int:
    return launch_trainer(train, cfg, load_init_source, adopt_architecture)


def train(cfg: VQGANTrainConfig, dist: distributed.DistInfo, init: InitSource | None = None) -> int:
    device = dist.device
    configure_backends(device)
    dtype = resolve_precision(cfg.precision, device)
    train_split, val_split = load_splits(cfg)
    if cfg.eval_fid and val_split is None:
        raise RunError(f"{cfg.data}: --eval-fid measures rFID on the val split, and there is none; re-shard with --val-count")
    inception = load_inception(cfg.inception_weights, device) if cfg.eval_fid else None   # missing weights stop here
    if cfg.fid_ref:
        check_reference_path(cfg.fid_ref)
    # statistics of --fid-ref or the val originals, made at the first eval by every rank (and cached beside shards)
    val_reference = None
    # the optimizer's state differs; seed, flips and channel orders are part of the data order an exact resume
    # replays (the share of permuted images only where the orders are drawn: an RGB run resumes under any share)
    orders = ("seed", "flip", "permute_channels") + (("permuted_share",) if cfg.permute_channels else ())
    run = TrainingRun(cfg, dist, "vqgan", ARCHITECTURE_FIELDS + ("optimizer",) + orders)
    resume = run.load_resume_state()
    seed_everything(cfg.seed)   # identical init on every rank (a random LPIPS backbone too)
    perceptual = build_perceptual(cfg)
    if perceptual is not None:
        perceptual = perceptual.to(device)
    vqgan = VQGAN(subconfig(VQGANConfig, cfg)).to(device)
    discriminator = NLayerDiscriminator(3, cfg.disc_ndf, cfg.disc_layers).to(device)
    if cfg.channels_last:
        vqgan = vqgan.to(memory_format=torch.channels_last)
        discriminator = discriminator.to(memory_format=torch.channels_last)
    opt_g = vqgan_optimizer(vqgan, cfg.optimizer, cfg.lr, cfg.adam_betas, device, cfg.muon_lr_scale)
    opt_d = adam(discriminator.parameters(), cfg.disc_lr or cfg.lr, cfg.adam_betas, device)
    scaler_g, scaler_d = grad_scaler(device, dtype), grad_scaler(device, dtype)   # fp16: one per optimizer
    loader = ShardLoader(train_split, cfg.batch_size, rank=dist.rank, world_size=dist.world_size, seed=cfg.seed,
                         flip=cfg.flip, permute_channels=cfg.permute_channels, permuted_share=cfg.permuted_share,
                         device=device, prefetch=cfg.prefetch, grad_accum=cfg.grad_accum)
    run.track({"vqgan": vqgan, "discriminator": discriminator}, opt_g=opt_g, opt_d=opt_d, scaler_g=scaler_g,
              scaler_d=scaler_d, loader=loader)
    step = 0
    seed_everything(cfg.seed + 7919 * dist.rank)   # per-rank streams from here on
    if resume is not None:
        step = run.restore(resume)
    elif init is not None:   # a fine-tune: the source's weights, fresh optimizers, step 0
        vqgan.load_state_dict(init.vqgan)
        if init.discriminator is not None:
            discriminator.load_state_dict(init.discriminator)
    ema = WeightEMA.start(vqgan, cfg.weight_ema_decay, resume, ema_key("vqgan"))
    if ema is not None:
        run.networks[ema_key("vqgan")] = ema.model   # in every checkpoint; checked equal on every rank like the VQGAN
    eval_vqgan = vqgan if ema is None else ema.model

    models = VQGANModels(vqgan=vqgan, discriminator=discriminator, raw_vqgan=vqgan,
                         raw_discriminator=discriminator, perceptual=perceptual)
    if dist.is_distributed:
        models.vqgan = distributed.wrap_ddp(vqgan, device)
        models.discriminator = distributed.wrap_ddp(discriminator, device)
    if cfg.compile:
        models.vqgan = torch.compile(models.vqgan)

    lpips_backbone = "off" if perceptual is None else perceptual.backbone
    run.write_config({"lpips_backbone": lpips_backbone, "image_shards": str(Path(cfg.data).resolve())})
    log = RunLog(cfg.out, dist.is_main, cfg.max_steps, step, "vqgan", cfg.progress, cfg.log_every,
                 cfg.wandb)
    log.print(run.describe())
    log.print(f"vqgan {count_parameters(vqgan) / 1e6:.2f}M parameters, discriminator "
              f"{count_parameters(discriminator) / 1e6:.2f}M, latent grid {vqgan.latent_grid}, "
              f"{dist.world_size} rank(s) on {device.type}, {str(dtype).replace('torch.', '')}, "
              f"global batch {cfg.batch_size * dist.world_size * cfg.grad_accum}, LPIPS backbone: {lpips_backbone}"
              + (f"; resumed from {resume['path']} at step {step}" if resume else ""))
    if cfg.disc_start >= cfg.max_steps and cfg.disc_weight > 0:
        log.print(f"WARNING: the GAN starts at step {cfg.disc_start} (--disc-start), not before this run ends at "
                  f"{cfg.max_steps}: it trains without the GAN (--disc-weight 0 says so and silences this)")
    if lpips_backbone == "random":
        log.print("WARNING: --lpips-random-backbone: the perceptual term uses an untrained VGG (smoke runs only)")
    if init is not None and resume is None:
        log.print(f"initialised from {init.path}: networks"
                  + (" and discriminator" if init.discriminator is not None else " (fresh discriminator)"))
    run.install_signal_handlers()

    stop = False
    images_seen, codes_restarted, clock = 0, 0, time.perf_counter()   # both since the last train log line
    while step < cfg.max_steps and not stop:
        lr = warmup_cosine(step, cfg.max_steps, cfg.warmup_steps, cfg.lr, cfg.min_lr_ratio)
        set_lr(opt_g, lr)
        set_lr(opt_d, lr * (cfg.disc_lr or cfg.lr) / cfg.lr)
        gan_active = step >= cfg.disc_start
        # a skipped (non-finite or fp16-overflow) step must not keep what its forward changed
        before_forward = [tensor.clone() for tensor in state_changed_by_forward(models, gan_active)]
        terms: dict[str, torch.Tensor] = {}
        for micro in range(cfg.grad_accum):
            images = to_unit_range(next(loader).items.to(device, non_blocking=True))
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            sync = micro == cfg.grad_accum - 1
            with distributed.no_sync(models.vqgan, not sync):
                recon, micro_terms = generator_backward(models, images, cfg, gan_active, 1 / cfg.grad_accum, dtype,
                                                        scaler_g)
            if gan_active:
                with distributed.no_sync(models.discriminator, not sync):
                    micro_terms.update(discriminator_backward(models, images, recon, 1 / cfg.grad_accum, dtype,
                                                              scaler_d))
            for key, value in micro_terms.items():
                terms[key] = terms.get(key, 0) + value.float() / cfg.grad_accum
            images_seen += len(images) * dist.world_size
        clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        scaler_g.unscale_(opt_g)   # no-ops unless fp16; an fp16 overflow makes the step non-finite: skipped
        terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(vqgan.parameters(), clip)
        if gan_active:
            scaler_d.unscale_(opt_d)
            terms["disc_grad_norm"] = torch.nn.utils.clip_grad_norm_(discriminator.parameters(), clip)
        finite = bool(torch.isfinite(torch.stack([v.float() for v in terms.values()])).all())
        stop, skip = run.end_of_step_consensus(finite, step)
        if not skip:
            scaler_g.step(opt_g)
            if gan_active:
                scaler_d.step(opt_d)
        else:
            with torch.no_grad():
                for saved, tensor in zip(before_forward, state_changed_by_forward(models, gan_active)):
                    tensor.copy_(saved)
        codes_restarted += after_optimizer_step(vqgan, opt_g, skip)
        if ema is not None and not skip:
            ema.update()   # after the code restarts: the average follows the codebook the step left
        scaler_g.update()   # after an overflow: a smaller scale
        if gan_active:
            scaler_d.update()
        opt_g.zero_grad(set_to_none=True)
        opt_d.zero_grad(set_to_none=True)
        step += 1

        log.advance({"l1": terms["l1"], "lr": lr})
        if run.is_due(step, cfg.log_every):
            elapsed = time.perf_counter() - clock
            log.log(step, "train", {**{k: v.item() for k, v in terms.items()}, "lr": lr,
                                    "codes_restarted": codes_restarted, "images_per_s": images_seen / max(elapsed, 1e-9),
                                    "epoch": loader.epoch, "skipped_steps": run.skipped_steps})
            images_seen, codes_restarted, clock = 0, 0, time.perf_counter()
        # saved before the eval: an eval that fails must not cost the steps since the last checkpoint
        run.checkpoint_if_due(step, stop, log)
        if val_split is not None and run.is_due(step, cfg.eval_every):
            if inception is not None and val_reference is None:   # every rank extracts a share; rank 0 gets the result
                val_reference = reference_statistics(cfg.fid_ref or cfg.data, "val", inception, cfg.eval_batch_size,
                                                     rank=dist.rank, world_size=dist.world_size)
            if dist.is_main:
                metrics, grid_rows = evaluate(eval_vqgan, perceptual if lpips_backbone == "pretrained" else None,
                                              val_split, cfg.eval_batch_size, cfg.codebook_size, device, dtype,
                                              inception=inception,
                                              reference_stats=val_reference.stats if val_reference else None)
                log.log(step, "eval", metrics)
                log.print(f"step {step} eval {summary_line(metrics)}")
                grid_path = Path(cfg.out) / "samples" / f"recon_{step:08d}.png"
                grid_path.parent.mkdir(parents=True, exist_ok=True)
                save_png(grid_path, image_grid(grid_rows), upscale=max(1, 128 // cfg.image_size))
            distributed.barrier()
    return run.finish(loader, log)


if __name__ == "__main__":
    sys.exit(exit_on_user_error(
        lambda: main(parse_config(VQGANTrainConfig, VQGAN_TRAIN_PRESETS, description=__doc__)), "train_resnet_vqgan"))
