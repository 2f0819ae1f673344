"""Every stage's settings: one frozen dataclass each, with named presets (parsed by vqgpt/config.py).

The trainers share `TrainConfig` (run folder, schedule, precision, checkpoints) and add their
network's config from models/; the other scripts (shardify, quantizer, sample, evaluate, import,
export) each have their own.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from models.gpt import GPT_PRESETS, GPTConfig
from models.vqgan import VQGAN_PRESETS, VQGANConfig
from vqgpt.checkpoint import MAX_STEP
from vqgpt.config import (PRECISIONS, PROGRESS_HELP, PROGRESS_MODES, check_finite, check_not_negative,
                          check_precision, setting)
from vqgpt.ema import WEIGHT_CHOICES, WEIGHTS_HELP
from vqgpt.sampling import CFG_SCHEDULES


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings every trainer shares (run folder, schedule, precision, checkpoints)."""
    not_offered: ClassVar[tuple[str, ...]] = ()   # fields the stage sets itself: no flag for them
    # pairs of flags refused together (parse_config): the first follows from the second
    follows_from: ClassVar[dict[str, str]] = {"grad_accum": "global_batch_size"}
    # a flag refused unless another setting has this value, or unless (what it needs, a test) holds (parse_config)
    applies_only_with: ClassVar[dict[str, tuple]] = {"inception_weights": ("eval_fid", True)}
    out: str = setting("run folder: checkpoints, metrics.jsonl, figures", "runs/run")
    resume: str = setting("auto (latest checkpoint in --out, if any), none (fresh; refuses a used --out), or a checkpoint path", "auto")
    max_steps: int = setting("optimizer steps in total", 10000)
    batch_size: int = setting("images (or token sequences) per rank per micro-step (with --global-batch-size: the "
                              "most per micro-step)", 8)
    grad_accum: int = setting("micro-steps per optimizer step; global batch = batch_size x ranks x grad_accum", 1)
    global_batch_size: int = setting("images (or sequences) per optimizer step over all ranks: the per-rank batch and "
                                     "--grad-accum follow from it and the world size, so a resume on another number "
                                     "of GPUs keeps it (0: batch_size x ranks x grad_accum)", 0)
    lr: float = setting("peak learning rate", 1e-4)
    min_lr_ratio: float = setting("cosine decays to lr x this", 0.1)
    warmup_steps: int = setting("linear warmup steps", 500)
    weight_decay: float = setting("AdamW weight decay of the GPT's matrices (the VQGAN trains without)", 0.0)
    grad_clip: float = setting("clip the global gradient norm to this (0: off)", 1.0)
    eval_every: int = setting("evaluate on the whole val split every N steps (0: only at the end)", 1000)
    eval_batch_size: int = setting("batch size for evaluation", 32)
    ckpt_every: int = setting("checkpoint every N steps (always at the end and on SIGTERM/SIGINT)", 1000)
    keep_last: int = setting("keep the newest N checkpoints", 3)
    keep_every: int = setting("also keep every checkpoint whose step is a multiple of N, for good (0: none)", 0)
    log_every: int = setting("write training metrics every N steps", 10)
    seed: int = setting("seed of data order, init and sampling", 0)
    device: str = setting("auto, cpu or cuda", "auto")
    precision: str = setting("auto: bf16 autocast on CUDA, fp16 on GPUs without bf16, fp32 on CPU; fp16 autocasts with a "
                             "gradient scaler", "auto", choices=PRECISIONS)
    compile: bool = setting("torch.compile the model (CUDA or CPU; the first steps compile for a minute or more)", False)
    max_bad_steps: int = setting("stop after this many non-finite steps in a row", 20)
    progress: str = setting(PROGRESS_HELP + " (a line every --log-every steps)", "auto", choices=PROGRESS_MODES)
    wandb: str = setting("also log the training and eval scalars and the config to this Weights & Biases project "
                         "(rank 0; needs pip install wandb; WANDB_MODE=offline works without network)", "")
    prefetch: int = setting("batches prefetched by the reader thread", 4)
    stop_at_step: int = setting("checkpoint and exit after this step, as a preemption would (0: run to max_steps)", 0)
    eval_fid: bool = setting("add rFID (VQGAN) or gFID (GPT) to each eval; needs the Inception weights", False)
    inception_weights: str = setting("path to weights-inception-2015-12-05-6726825d.pth (default: the torch hub cache)", "")
    # saved as weight_ema_decay: a saved `ema_decay` is the removed EMA codebook of the VQGAN's quantizer
    weight_ema_decay: float = setting("keep an EMA of the weights, updated after each optimizer step with this decay "
                                      "(e.g. 0.9999); evals, sampling, evaluate.py, image_quantizer.py and export.py "
                                      "use it (0: off)", 0.0, aliases=("--ema-decay",))
    fid_ref: str = setting("reference of --eval-fid: image shard folder (its val split for the VQGAN, train for the "
                           "GPT), image folder or ADM .npz (default: --data's val split; for the GPT the image shards "
                           "its tokens were made from)", "")

    def __post_init__(self):
        # caught here, at parse time, not hours later at the first eval or checkpoint
        check_finite(self)
        check_not_negative(self, ("seed",))
        positive = ("max_steps", "batch_size", "grad_accum", "eval_batch_size", "ckpt_every", "keep_last", "log_every",
                    "max_bad_steps", "prefetch")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip", "eval_every", "stop_at_step",
                     "global_batch_size", "keep_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if self.max_steps > MAX_STEP:
            raise ValueError(f"--max-steps must be at most {MAX_STEP} (the eight digits of step_XXXXXXXX.pt), "
                             f"got {self.max_steps}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.weight_ema_decay < 1:
            raise ValueError(f"--ema-decay must be in [0, 1) (0: off), got {self.weight_ema_decay}")
        if self.min_lr_ratio > 1:
            raise ValueError(f"--min-lr-ratio must be at most 1 (the cosine decays to lr x this), got {self.min_lr_ratio}")
        if not self.out.strip():
            raise ValueError("--out must name a run folder (an empty one is the working directory)")
        if self.fid_ref and not self.eval_fid:
            raise ValueError("--fid-ref is the reference of --eval-fid; add --eval-fid or drop it")
        check_precision(self.precision)
        network_checks = getattr(super(), "__post_init__", None)   # the network config's own checks
        if network_checks is not None:
            network_checks()


@dataclasses.dataclass(frozen=True)
class VQGANTrainConfig(TrainConfig, VQGANConfig):
    """Stage 1: the VQGAN, its discriminator, losses and schedule."""
    not_offered: ClassVar[tuple[str, ...]] = ("weight_decay",)   # the VQGAN trains with Adam without weight decay
    applies_only_with: ClassVar[dict[str, tuple]] = {
        **TrainConfig.applies_only_with, "muon_lr_scale": ("optimizer", "muon"),
        "permuted_share": ("permute_channels", True),
        "lpips_weights": ("--perceptual-weight above 0 and --lpips-random-backbone false",
                          lambda cfg: cfg.perceptual_weight > 0 and not cfg.lpips_random_backbone),
        "lpips_random_backbone": ("--perceptual-weight above 0", lambda cfg: cfg.perceptual_weight > 0)}
    data: str = setting("image shard folder made by shardify.py", "", required=True)
    verify: bool = setting("read every image shard whole before step one and check its sha256 against the manifest "
                           "(a large set takes minutes; without it only the manifest and the .npy headers are checked)",
                           False)
    flip: bool = setting("random horizontal flips", True)
    permute_channels: bool = setting("give each training image its RGB channels in a random order (one of six): on a small "
                                     "set the model cannot learn the training images' palette and paint it onto unseen "
                                     "images", False)
    permuted_share: float = setting("with --permute-channels: the share of training images given one of the five "
                                    "orders other than RGB, the rest keep theirs (5/6: all six orders alike)", 5 / 6)
    l1_weight: float = setting("weight of the L1 reconstruction term (taming's)", 1.0)
    l2_weight: float = setting("weight of the squared-error reconstruction term (LlamaGen's)", 0.0)
    chroma_weight: float = setting("weight of the colour part of the L1 / squared error (the error minus its grey "
                                   "level) against the grey part", 1.0)
    perceptual_weight: float = setting("weight of the LPIPS term (0: off, no VGG weights needed)", 1.0)
    lpips_weights: str = setting("path to vgg16-397923af.pth (default: the torch hub cache)", "")
    lpips_random_backbone: bool = setting("LPIPS with a RANDOM VGG backbone, for offline smoke runs only", False)
    init_from: str = setting("start a new run from the weights of a VQGAN run, checkpoint or exported folder (and its "
                             "discriminator when it has one): fresh optimizers, step 0, the architecture of the source", "")
    disc_start: int = setting("step at which the discriminator and the GAN term start", 2000)
    disc_weight: float = setting("scale of the GAN term", 0.8)
    adaptive_disc_weight: bool = setting("scale the GAN term by ||grad L_rec|| / ||grad L_G|| on the last layer", True)
    disc_weight_max: float = setting("clamp of the adaptive weight", 1e4)
    disc_lr: float = setting("discriminator learning rate (0: same as --lr)", 0.0)
    adam_betas: tuple[float, ...] = setting("Adam betas of both optimizers (taming: 0.5,0.9)", (0.5, 0.9))
    optimizer: str = setting("the VQGAN's optimizer: adam, or muon (orthogonalised momentum on the hidden layers' "
                             "weights, Adam on the rest; the discriminator stays on Adam)", "adam",
                             choices=("adam", "muon"))
    muon_lr_scale: float = setting("muon: each update of a hidden weight has RMS 0.2 x lr x this", 3.0)
    channels_last: bool = setting("channels_last memory format for the VQGAN and discriminator", False)

    def __post_init__(self):
        super().__post_init__()
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"--adam-betas must be two values in [0, 1), got {self.adam_betas}")
        if self.weight_decay:   # accepted and ignored before; taming and LlamaGen train their VQGANs without
            raise ValueError(f"--weight-decay {self.weight_decay}: the VQGAN trains with Adam without weight decay; "
                             "it applies to the GPT only")
        if not 0 <= self.permuted_share <= 1:
            raise ValueError(f"--permuted-share must be in [0, 1], got {self.permuted_share}")
        if self.muon_lr_scale <= 0:
            raise ValueError(f"--muon-lr-scale must be positive, got {self.muon_lr_scale}")
        if self.l1_weight == self.l2_weight == self.perceptual_weight == 0:
            raise ValueError("--l1-weight, --l2-weight and --perceptual-weight are all 0: nothing would teach the "
                             "VQGAN to reconstruct")
        check_not_negative(self, ("l1_weight", "l2_weight", "chroma_weight", "perceptual_weight", "disc_weight",
                                   "disc_weight_max", "disc_lr", "disc_start", "muon_lr_scale"))


def _vqgan_preset(name: str, **settings) -> VQGANTrainConfig:
    return VQGANTrainConfig(**dataclasses.asdict(VQGAN_PRESETS[name]), **settings)


# Ours (bench/quality.py on real images): squared error instead of taming's L1 (LlamaGen's reconstruction term;
# better than L1 on both real-image sets, and over two seeds L1 + squared error's PSNR with +0.024 photograph
# SSIM), a short warmup so a short run reaches its learning rate, and LlamaGen's Adam betas.
_OURS = dict(l1_weight=0.0, l2_weight=1.0, warmup_steps=20, adam_betas=(0.9, 0.95))


def _taming_preset(name: str, batch_size: int, **settings) -> VQGANTrainConfig:
    """taming-transformers' schedule: lr 4.5e-6 x batch size (one GPU), constant, no warmup."""
    return _vqgan_preset(name, batch_size=batch_size, lr=4.5e-6 * batch_size, warmup_steps=0, min_lr_ratio=1.0,
                         **settings)


VQGAN_TRAIN_PRESETS = {
    # disc_weight 0.1: at this scale (and with the offline random LPIPS backbone) 0.8 lets GAN noise win
    "tiny": _vqgan_preset("tiny", batch_size=16, lr=5e-4, warmup_steps=100, max_steps=2000, disc_start=1000,
                          disc_weight=0.1, eval_every=500, ckpt_every=500, eval_batch_size=100, out="runs/vqgan-tiny"),
    # permute_channels on half the training images with the colour part of the error x2: without them the
    # photographs' unseen night and storm skies came back grey-green; permuting all six orders alike confused the
    # drawings' hues and, like a chroma weight of 4, left the photographs' val crops under 90% of the codes
    # (BENCHMARKS runs 97-118 and the bench of share 0.5 + chroma weight 2).
    # optimizer muon: the same network learns faster (bench/quality.py against Adam, same seeds: clip art +1.3 dB,
    # +0.10 SSIM; photographs +2.2 dB and their unseen colours back); seed / f16-16384 stay on Adam, not measured
    # at 256 px or on long runs.
    # disc_start: the GAN for the second half of the default 10,000 steps
    "b64": _vqgan_preset("b64", **_OURS, optimizer="muon", batch_size=8, lr=2e-4, disc_start=5000,
                         permute_channels=True, permuted_share=0.5, chroma_weight=2.0, out="runs/vqgan-b64"),
    # the 256 px presets keep a weight EMA (a horizon of 10,000 steps on runs of 300,000 and more); the short
    # and demo presets none: over a few thousand steps it would lag far behind the weights
    "seed": _vqgan_preset("seed", **{**_OURS, "warmup_steps": 100}, batch_size=8, lr=1e-4, disc_start=30000,
                          max_steps=300000, eval_every=5000, ckpt_every=5000, weight_ema_decay=0.9999,
                          out="runs/vqgan-seed"),
    "f16-16384": _vqgan_preset("f16-16384", **{**_OURS, "warmup_steps": 100}, batch_size=12, lr=1e-4,
                               disc_start=250001, max_steps=1000000, eval_every=5000, ckpt_every=5000,
                               weight_ema_decay=0.9999, out="runs/vqgan-f16-16384"),
    # taming's configs: custom_vqgan.yaml, vqgan_imagenet_f16_1024.yaml, vqgan_imagenet_f16_16384.yaml
    "taming-b64": _taming_preset("taming-b64", batch_size=8, disc_start=10000, max_steps=20000,
                                 out="runs/vqgan-taming-b64"),
    "taming-f16-1024": _taming_preset("taming-f16-1024", batch_size=12, disc_start=250001, max_steps=1000000,
                                      eval_every=5000, ckpt_every=5000, out="runs/vqgan-taming-f16-1024"),
    "taming-f16-16384": _taming_preset("taming-f16-16384", batch_size=12, disc_start=0, disc_weight=0.75,
                                       max_steps=1000000, eval_every=5000, ckpt_every=5000,
                                       out="runs/vqgan-taming-f16-16384"),
}


@dataclasses.dataclass(frozen=True)
class ShardifyConfig:
    """Stage 0: an image folder (or the built-in dataset) -> uint8 image shards and a manifest."""
    paths: tuple[str, ...] = setting("SRC DEST: the image folder and the shard folder to write (DEST alone with "
                                     "--builtin)", (), positional=True, metavar="PATH")
    builtin: str = setting("draw this built-in labelled dataset instead of reading SRC", "", choices=("shapes",))
    builtin_count: int = setting("images in the built-in dataset", 4000)
    size: int = setting("output side in pixels (0: 256, or 32 with --builtin)", 0)
    stored_size: int = setting("store images at this side (at least --size), and the VQGAN trainer reads a random "
                               "--size crop of each (evaluation and quantizing the centre); LlamaGen crops from 1.1x, "
                               "281 for 256 (0: --size)", 0)
    shard_size: int = setting("images per shard file", 1000)
    val_fraction: float | None = setting("share of images for validation (none: 0.01 unless --val-count)", None)
    val_count: int | None = setting("exact number of validation images (instead of --val-fraction)", None)
    resize: str = setting("how an image becomes a square: lanczos (its centre square, Lanczos) or adm (ADM's "
                          "center_crop_arr: box halvings, bicubic, centre crop; FID references that match "
                          "ADM/LlamaGen's)", "lanczos", choices=("lanczos", "adm"))
    workers: int = setting("decoding processes (0: all cores this process may use)", 0)
    seed: int = setting("seed of the split and order shuffle", 0)
    labels: str = setting("auto: first-level sub-folders are classes; none: no labels", "auto", choices=("auto", "none"))
    overwrite: bool = setting("replace the shard set already in DEST (the new set is built aside, then swapped in)",
                              False)
    progress: str = setting(PROGRESS_HELP, "auto", choices=PROGRESS_MODES)

    def __post_init__(self):
        if len(self.paths) != (1 if self.builtin else 2):
            raise ValueError("give DEST alone with --builtin" if self.builtin else "give SRC and DEST")
        if not all(path.strip() for path in self.paths):   # '' would be the working directory
            raise ValueError("SRC and DEST must not be empty")
        check_finite(self)
        check_not_negative(self, ("seed", "workers", "size", "stored_size"))
        if self.stored_size and self.stored_size < self.image_size:
            raise ValueError(f"--stored-size {self.stored_size} is below the image size {self.image_size}; "
                             "it must hold a whole --size crop")
        if self.size and self.size < 8 or self.shard_size < 1 or self.builtin_count < 1:
            raise ValueError(f"--size must be at least 8, --shard-size and --builtin-count at least 1; got "
                             f"{self.size}, {self.shard_size}, {self.builtin_count}")
        if self.val_fraction is not None and self.val_count is not None:
            raise ValueError("give --val-fraction or --val-count, not both")
        if self.val_fraction is not None and not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_count is not None and self.val_count < 0:
            raise ValueError(f"--val-count must not be negative, got {self.val_count}")
        if self.builtin and self.resize != "lanczos":
            raise ValueError("--resize applies to image files; --builtin draws its images at --size")
        if self.resize == "adm" and self.stored_size not in (0, self.image_size):
            # a --size crop of an ADM crop made at the stored size is a zoom, not ADM's crop at --size
            raise ValueError("--resize adm makes ADM's crop at --size (for FID references); it does not combine "
                             "with --stored-size")

    @property
    def source(self) -> str:
        return "" if self.builtin else self.paths[0]

    @property
    def dest(self) -> str:
        return self.paths[-1]

    @property
    def image_size(self) -> int:
        return self.size or (32 if self.builtin else 256)


SHARDIFY_PRESETS: dict[str, ShardifyConfig] = {}


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """Stage 1.5: image shards -> codebook-index token shards."""
    vqgan: str = setting("VQGAN run folder (its latest checkpoint) or checkpoint file", "", required=True)
    data: str = setting("image shard folder made by shardify.py", "", required=True)
    out: str = setting("token shard folder to write", "", required=True)
    batch_size: int = setting("images per encoder batch", 64)
    flip: bool = setting("also encode horizontally flipped training images (a second token shard set)", False)
    crops: int = setting("also encode K sets of random crops of the training images (shards stored larger with "
                         "shardify --stored-size; LlamaGen's ten-crop: 10); the GPT trains on every set", 0)
    device: str = setting("auto, cpu or cuda", "auto")
    precision: str = setting("auto: bf16 autocast on CUDA, fp32 on CPU; the code lookup is always fp32", "auto",
                             choices=PRECISIONS)
    weights: str = setting(WEIGHTS_HELP + "; the manifest records which", "ema", choices=WEIGHT_CHOICES)
    compile: bool = setting("torch.compile the encoder and code lookup (the first batch compiles for a minute or more)", False)
    channels_last: bool = setting("channels_last memory format for the encoder", False)
    progress: str = setting(PROGRESS_HELP, "auto", choices=PROGRESS_MODES)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        check_not_negative(self, ("crops",))
        check_finite(self)
        check_precision(self.precision)


QUANTIZE_PRESETS: dict[str, QuantizeConfig] = {}


@dataclasses.dataclass(frozen=True)
class ImportConfig:
    """import_vqgan.py: a published VQ tokenizer -> a VQGAN run folder of this project."""
    # taming's model.yaml gives the architecture; LlamaGen's checkpoint holds no config
    applies_only_with: ClassVar[dict[str, tuple]] = {
        "config": ("from_", "taming"), "image_size": ("from_", "llamagen"), "l2_norm": ("from_", "llamagen")}
    from_: str = setting("the source: taming (taming-transformers VQGAN) or llamagen (LlamaGen VQ-8 / VQ-16)", "",
                         required=True, choices=("taming", "llamagen"))
    ckpt: str = setting("the published checkpoint: taming's last.ckpt or LlamaGen's vq_ds16_c2i.pt", "", required=True)
    config: str = setting("taming's model.yaml (--from taming)", "")
    out: str = setting("run folder to create; must not exist or be empty", "", required=True)
    image_size: int = setting("--from llamagen: the training and evaluation resolution (its weights fit any)", 256)
    l2_norm: bool = setting("--from llamagen: the codebook is l2-normalised (codebook_l2_norm, true for VQ-8 / VQ-16)", True)

    def __post_init__(self):
        if self.from_ == "taming" and not self.config:
            raise ValueError("--from taming needs --config: taming's model.yaml")
        if self.image_size < 1:
            raise ValueError(f"--image-size must be positive, got {self.image_size}")


IMPORT_PRESETS: dict[str, ImportConfig] = {}


@dataclasses.dataclass(frozen=True)
class ImportGPTConfig:
    """import_gpt.py: a published class-conditional GPT -> a GPT run folder of this project."""
    from_: str = setting("the source: llamagen (LlamaGen's c2i GPT-B ... GPT-XXL)", "", required=True,
                         choices=("llamagen",))
    ckpt: str = setting("the published checkpoint, e.g. LlamaGen's c2i_B_256.pt", "", required=True)
    out: str = setting("run folder to create; must not exist or be empty", "", required=True)
    vqgan: str = setting("VQGAN run, checkpoint or export whose codes the GPT predicts (e.g. LlamaGen's VQ-16 "
                         "imported by import_vqgan.py): sample.py decodes with it; without it the run only fine-tunes "
                         "and exports", "")
    n_head: int = setting("attention heads (0: from the model name in the checkpoint's args)", 0)
    grid_size: int = setting("side of the token grid (0: from the checkpoint's args, else the --vqgan's latent grid)", 0)

    def __post_init__(self):
        check_not_negative(self, ("n_head", "grid_size"))


IMPORT_GPT_PRESETS: dict[str, ImportGPTConfig] = {}


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """export.py: a VQGAN or GPT run (or checkpoint) -> config.json + model.safetensors + model card."""
    run: str = setting("VQGAN or GPT run folder (its latest checkpoint) or checkpoint file (also the first word: "
                       "export.py RUN --out DIR)", "", required=True)
    out: str = setting("folder to create; must not exist or be empty", "", required=True)
    weights: str = setting(WEIGHTS_HELP, "ema", choices=WEIGHT_CHOICES)


EXPORT_PRESETS: dict[str, ExportConfig] = {}


@dataclasses.dataclass(frozen=True)
class GPTTrainConfig(TrainConfig, GPTConfig):
    """Stage 2: the GPT over token grids. The model takes the tokens' codebook size (unless
    --codebook-size says otherwise), grid length and classes from their manifest."""
    min_codebook_size: ClassVar[int] = 0
    not_offered: ClassVar[tuple[str, ...]] = ("n_classes", "tokens_per_image")   # from the token manifest
    applies_only_with: ClassVar[dict[str, tuple]] = {
        **TrainConfig.applies_only_with, "eval_fid_samples": ("eval_fid", True),
        **dict.fromkeys(("vqgan", "sample_temperature", "sample_top_k"), (
            "--sample-count above 0 or --eval-fid true", lambda cfg: cfg.sample_count > 0 or cfg.eval_fid))}
    codebook_size: int = setting("codes in the vocabulary (0: the token manifest's codebook size)", 0)
    tokens: str = setting("token shard folder made by image_quantizer.py", "", required=True)
    vqgan: str = setting("VQGAN checkpoint for sample grids (default: the one the token manifest names; sha256 checked)", "")
    sample_count: int = setting("images in the sample grid at each eval (0: no samples, no VQGAN needed)", 16)
    sample_temperature: float = setting("temperature of the eval samples", 1.0)
    sample_top_k: int = setting("top-k of the eval samples (0: off)", 0)
    beta2: float = setting("AdamW beta2", 0.95)
    init_from: str = setting("start a new run from the weights of a GPT run (an imported one too), checkpoint or exported "
                             "folder: fresh optimizer, step 0, the architecture of the source; its codebook, classes and "
                             "grid must be the tokens'", "")
    eval_fid_samples: int = setting("class-balanced samples scored by --eval-fid against the train images", 1000)
    fsdp: bool = setting("under torchrun, shard the GPT's parameters, gradients and optimizer state over the ranks "
                         "(FSDP2) instead of replicating them (DDP), for models whose optimizer state does not fit "
                         "one GPU; checkpoints stay full, any world size resumes them with or without it", False)

    def __post_init__(self):
        super().__post_init__()
        if self.fsdp and self.compile:   # not tested sharded
            raise ValueError("--fsdp does not combine with --compile yet; drop one of them")
        if self.eval_fid_samples < 2:   # a covariance needs two samples
            raise ValueError(f"--eval-fid-samples must be at least 2, got {self.eval_fid_samples}")
        if self.sample_count < 0 or self.sample_top_k < 0 or self.sample_temperature <= 0:
            raise ValueError("--sample-count and --sample-top-k must not be negative, --sample-temperature must be "
                             f"positive; got {self.sample_count}, {self.sample_top_k}, {self.sample_temperature}")
        if not 0 <= self.beta2 < 1:
            raise ValueError(f"--beta2 must be in [0, 1), got {self.beta2}")


def _gpt_preset(name: str, **settings) -> GPTTrainConfig:
    """The network of GPT_PRESETS[name], its codebook size taken from the tokens at start."""
    return GPTTrainConfig(**{**dataclasses.asdict(GPT_PRESETS[name]), "codebook_size": 0}, **settings)


GPT_TRAIN_PRESETS = {
    "tiny": _gpt_preset("tiny", batch_size=32, lr=1e-3, warmup_steps=100, max_steps=3000, eval_every=1000,
                        ckpt_every=1000, weight_decay=0.01, eval_batch_size=100, sample_count=16, out="runs/gpt-tiny"),
    "g256": _gpt_preset("g256", batch_size=8, lr=3e-4, warmup_steps=1000, max_steps=100000, weight_decay=0.01,
                        eval_every=2000, ckpt_every=2000, out="runs/gpt-g256"),
    "seed": _gpt_preset("seed", batch_size=16, lr=3e-4, warmup_steps=2000, max_steps=300000, weight_decay=0.01,
                        eval_every=5000, ckpt_every=5000, weight_ema_decay=0.9999, out="runs/gpt-seed"),
    # LlamaGen's c2i recipe: constant lr 1e-4 without warmup, AdamW (0.9, 0.95), weight decay 0.05, 256 sequences a
    # step (at most 32 a rank per micro-step), 300 ImageNet epochs
    **{f"llamagen-{size}": _gpt_preset(f"llamagen-{size}", global_batch_size=256, batch_size=32, lr=1e-4, warmup_steps=0,
                                       min_lr_ratio=1.0, weight_decay=0.05, max_steps=1_500_000, eval_every=5000,
                                       ckpt_every=5000, weight_ema_decay=0.9999,
                                       out=f"runs/gpt-llamagen-{size}")
       for size in ("B", "L", "XL", "XXL")},
}


CFG_SCHEDULE_HELP = ("how the guidance scale varies over the token grid: constant (--cfg at every token) or linear "
                     "(token i of L gets 1 + (cfg - 1) x i / (L - 1): 1 at the first token, --cfg at the last)")
CFG_INTERVAL_HELP = ("guide only the first K tokens of the grid, the rest with scale 1 (0: all). LlamaGen's cfg_interval "
                     "counts otherwise: its K guides K + 2 tokens (and -1 all), so give its K + 2 here")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """sample.py: images from a GPT, decoded by the VQGAN that made its tokens."""
    gpt: str = setting("GPT run folder (its latest checkpoint) or checkpoint file", "", required=True)
    out: str = setting("folder for the PNGs", "", required=True)
    num_samples: int = setting("images to sample", 16, aliases=("--n",))
    class_: int | None = setting("class id (class-conditional models; none: unconditional)", None)
    cfg: float = setting("classifier-free guidance scale (1: plain conditional; needs --class or labelled --complete)",
                         1.0)
    cfg_schedule: str = setting(CFG_SCHEDULE_HELP, "constant", choices=CFG_SCHEDULES)
    cfg_interval: int = setting(CFG_INTERVAL_HELP, 0)
    temperature: float = setting("softmax temperature (0: greedy)", 1.0)
    top_k: int = setting("sample among the k most likely codes (0: off)", 0)
    top_p: float = setting("nucleus sampling mass (1: off)", 1.0)
    seed: int = setting("random seed (same seed, same images)", 0)
    save_tokens: bool = setting("also write OUT/tokens.npy: the sampled codes, (n, grid x grid) int64 in raster order",
                                False)
    complete: str = setting("image shard folder (its val split), image folder or image file whose top rows to complete",
                            "")
    keep_rows: int | None = setting("token rows kept with --complete (none: half)", None)
    vqgan: str = setting("VQGAN checkpoint (default: the one named by the tokens; sha256 checked)", "")
    weights: str = setting(WEIGHTS_HELP, "ema", choices=WEIGHT_CHOICES)
    kv_cache: bool = setting("reuse the keys and values of the prefix (false: recompute it each step, the slow "
                             "reference)", True)
    device: str = setting("auto, cpu or cuda", "auto")
    precision: str = setting("auto: bf16 autocast on CUDA, fp32 on CPU; tokens are drawn from fp32 logits", "auto",
                             choices=PRECISIONS)
    compile: bool = setting("torch.compile the GPT and the VQGAN decoder (the first images compile for a minute or more)",
                            False)
    channels_last: bool = setting("channels_last memory format for the VQGAN", False)

    def __post_init__(self):
        check_finite(self)
        check_not_negative(self, ("seed", "temperature", "top_k", "cfg", "cfg_interval"))
        if self.num_samples < 1:
            raise ValueError(f"--num-samples (--n) must be at least 1, got {self.num_samples}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.keep_rows is not None and (self.keep_rows < 0 or not self.complete):
            raise ValueError(f"--keep-rows applies to --complete only and must not be negative, got {self.keep_rows}")
        if self.cfg != 1 and self.class_ is None and not self.complete:
            raise ValueError("--cfg guides towards a class: give --class K (or --complete labelled shards)")
        if self.complete and self.class_ is not None:   # it was ignored: each completion keeps its image's class
            raise ValueError("--class applies to new samples; --complete continues each image with its own class")
        check_precision(self.precision)


SAMPLE_PRESETS: dict[str, SampleConfig] = {}


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """evaluate.py: one of --vqgan (reconstructions), --gpt (samples) or --images, scored with FID."""
    vqgan: str = setting("VQGAN run or checkpoint to score on --data (with --gpt: a copy of the VQGAN its tokens name)", "")
    gpt: str = setting("GPT run or checkpoint: gFID and IS of --n class-balanced samples against --ref", "")
    images: str = setting("image folder or image shard folder to score against --ref", "")
    data: str = setting("image shard folder whose --split the VQGAN reconstructs", "")
    split: str = setting("split of --data, and of --images when that is a shard folder", "val")
    ref: str = setting("reference: image shard folder, image folder, or ADM-style .npz (arr_0 images or mu/sigma)", "")
    ref_split: str = setting("split of --ref when it is a shard folder", "train")
    # --n is what sample.py takes, but torchrun's own parser finds it ambiguous: under torchrun, --num-samples
    num_samples: int = setting("samples to generate with --gpt (a multiple of the number of classes)", 50000,
                               aliases=("--n",))
    cfg: float = setting("classifier-free guidance scale of the samples (1: plain conditional)", 1.0)
    cfg_schedule: str = setting(CFG_SCHEDULE_HELP, "constant", choices=CFG_SCHEDULES)
    cfg_interval: int = setting(CFG_INTERVAL_HELP, 0)
    temperature: float = setting("sampling temperature (0: greedy)", 1.0)
    top_k: int = setting("sample among the k most likely codes (0: off)", 0)
    top_p: float = setting("nucleus sampling mass (1: off)", 1.0)
    batch_size: int = setting("images per generation, reconstruction and Inception batch", 50)
    seed: int = setting("seed of the samples (the same on any number of ranks)", 0)
    save_samples: str = setting("folder to keep the --gpt samples as PNGs", "")
    save_npz: str = setting("also write the --gpt samples to this .npz in ADM's evaluator format (arr_0: uint8 "
                            "(N, H, W, 3), arr_1: classes)", "")
    inception_weights: str = setting("path to weights-inception-2015-12-05-6726825d.pth (default: the torch hub cache)", "")
    lpips_weights: str = setting("path to vgg16-397923af.pth for LPIPS with --vqgan (default: the torch hub cache; "
                                 "without it LPIPS is left out)", "")
    weights: str = setting(WEIGHTS_HELP + " (of the --vqgan or --gpt scored; a GPT's VQGAN decodes with the weights "
                           "that made its tokens)", "ema", choices=WEIGHT_CHOICES)
    cache: bool = setting("reuse and write reference statistics beside the reference shards", True)
    out: str = setting("also write the JSON result to this file", "")
    device: str = setting("auto, cpu or cuda", "auto")
    precision: str = setting("auto: bf16 autocast on CUDA, fp32 on CPU; Inception always runs in fp32", "auto",
                             choices=PRECISIONS)
    compile: bool = setting("torch.compile the VQGAN and the GPT (not Inception; the first batches compile for a minute "
                            "or more)", False)
    channels_last: bool = setting("channels_last memory format for the VQGAN", False)
    progress: str = setting(PROGRESS_HELP, "auto", choices=PROGRESS_MODES)

    def __post_init__(self):
        check_finite(self)
        check_not_negative(self, ("seed", "cfg_interval"))
        if self.num_samples < 2 or self.batch_size < 1:   # a covariance needs two samples
            raise ValueError(f"--num-samples must be at least 2 and --batch-size at least 1, got {self.num_samples}, "
                             f"{self.batch_size}")
        if self.temperature < 0 or self.top_k < 0 or self.cfg < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"--temperature, --top-k and --cfg must not be negative and --top-p must be in (0, 1]; "
                             f"got {self.temperature}, {self.top_k}, {self.cfg}, {self.top_p}")
        if self.save_npz and not self.save_npz.endswith(".npz"):   # what --images and ADM's evaluator recognise
            raise ValueError(f"--save-npz must name a .npz file, got {self.save_npz!r}")
        check_precision(self.precision)


EVALUATE_PRESETS: dict[str, EvaluateConfig] = {}
