"""Dataclass configs with named presets and `--key value` / `--key=value` overrides.

Every stage describes itself with one frozen dataclass. `parse_config` builds an argparse
parser from its fields (so `--help` lists every setting with its default), starts from the
chosen preset and applies only the flags the user actually gave.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from typing import Any, Sequence, TypeVar

from models.gpt import GPT_PRESETS, GPTConfig
from models.vqgan import VQGAN_PRESETS, VQGANConfig

C = TypeVar("C")


class ConfigError(ValueError):
    """A setting the user gave cannot be used; the message says which and why."""


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _tuple_parser(item_type: type):
    def parse(text: str) -> tuple:
        text = text.strip().strip("()[]")
        if not text:
            return ()
        try:
            return tuple(item_type(part) for part in text.split(",") if part.strip())
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected comma-separated {item_type.__name__}s, got {text!r}") from err
    return parse


def _field_parser(annotation: Any):
    """argparse `type=` callable for a dataclass field annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is tuple:
        return _tuple_parser(args[0] if args else str), "A,B,..."
    if origin is typing.Union or str(origin) == "types.UnionType":  # Optional[X] / X | None
        inner = [a for a in args if a is not type(None)][0]
        parse, metavar = _field_parser(inner)

        def parse_optional(text: str):
            return None if text.strip().lower() in ("none", "") else parse(text)
        return parse_optional, metavar
    if annotation is bool:
        return _parse_bool, "BOOL"
    if annotation in (int, float, str):
        return annotation, annotation.__name__.upper()
    raise TypeError(f"unsupported config field type {annotation!r}")


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, valid_keys: Sequence[str] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.valid_keys = list(valid_keys)

    def error(self, message: str):
        if "unrecognized arguments" in message:
            message += "\nvalid settings: " + " ".join(flag_name(k) for k in self.valid_keys)
        super().error(message)


def build_parser(cls: type, presets: dict[str, Any], description: str) -> argparse.ArgumentParser:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    parser = _Parser(description=description, valid_keys=["preset", *names],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, choices=sorted(presets),
                        help="named starting point; flags below override it (default: the dataclass defaults)")
    for f in dataclasses.fields(cls):
        parse, metavar = _field_parser(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        doc = (f.metadata or {}).get("help", "")
        if isinstance(default, tuple):
            shown = ",".join(str(v) for v in default)
        else:
            shown = default
        # a bare boolean flag (`--flip`) means true; `--flip false` / `--flip=false` still work
        bare = {"nargs": "?", "const": True} if hints[f.name] is bool else {}
        parser.add_argument(flag_name(f.name), dest=f.name, type=parse, metavar=metavar,
                            default=argparse.SUPPRESS, help=f"{doc} (default: {shown})".strip(), **bare)
    return parser


def parse_config(cls: type[C], presets: dict[str, C], argv: Sequence[str] | None = None,
                 description: str = "") -> C:
    """Preset (or defaults) + command-line overrides -> a validated config instance."""
    parser = build_parser(cls, presets, description)
    args = vars(parser.parse_args(sys.argv[1:] if argv is None else list(argv)))
    preset = args.pop("preset")
    base = presets[preset] if preset else cls()
    try:
        return dataclasses.replace(base, **args)
    except (TypeError, ValueError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")


def config_to_dict(cfg: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_from_dict(cls: type[C], data: dict) -> C:
    """Rebuild a config saved with `config_to_dict` (lists back to tuples, unknown keys rejected)."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; this version knows {sorted(known)}")
    values = {}
    for key, value in data.items():
        if typing.get_origin(hints[key]) is tuple and isinstance(value, list):
            value = tuple(value)
        values[key] = value
    return cls(**values)


def subconfig(target_cls: type[C], source: Any, **overrides) -> C:
    """Build `target_cls` from the same-named fields of a flat stage config."""
    names = {f.name for f in dataclasses.fields(target_cls)}
    values = {k: v for k, v in dataclasses.asdict(source).items() if k in names}
    values.update(overrides)
    return target_cls(**values)


def format_config(cfg: Any) -> str:
    return json.dumps(config_to_dict(cfg), indent=2)


def _check_precision(precision: str) -> None:
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"--precision must be auto, fp32 or bf16 (no fp16: it would need a GradScaler), "
                         f"got {precision!r}")


def _help(text: str, default):
    return dataclasses.field(default=default, metadata={"help": text})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings every trainer shares (run folder, schedule, precision, checkpoints)."""
    out: str = _help("run folder: checkpoints, metrics.jsonl, figures", "runs/run")
    resume: str = _help("auto (latest checkpoint in --out, if any), none (fresh; refuses a used --out), or a checkpoint path", "auto")
    max_steps: int = _help("optimizer steps in total", 10000)
    batch_size: int = _help("images (or token sequences) per rank per micro-step", 8)
    grad_accum: int = _help("micro-steps per optimizer step; global batch = batch_size x ranks x grad_accum", 1)
    lr: float = _help("peak learning rate", 1e-4)
    min_lr_ratio: float = _help("cosine decays to lr x this", 0.1)
    warmup_steps: int = _help("linear warmup steps", 500)
    weight_decay: float = _help("AdamW weight decay", 0.0)
    grad_clip: float = _help("clip the global gradient norm to this (0: off)", 1.0)
    eval_every: int = _help("evaluate on the whole val split every N steps (0: only at the end)", 1000)
    eval_batch_size: int = _help("batch size for evaluation", 32)
    ckpt_every: int = _help("checkpoint every N steps (always at the end and on SIGTERM/SIGINT)", 1000)
    keep_last: int = _help("keep the newest N checkpoints", 3)
    log_every: int = _help("write training metrics every N steps", 10)
    seed: int = _help("seed of data order, init and sampling", 0)
    device: str = _help("auto, cpu or cuda", "auto")
    precision: str = _help("auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16", "auto")
    compile: bool = _help("torch.compile the model (CUDA)", False)
    max_bad_steps: int = _help("stop after this many non-finite steps in a row", 20)
    prefetch: int = _help("batches prefetched by the reader thread", 4)
    stop_at_step: int = _help("checkpoint and exit after this step, as a preemption would (0: run to max_steps)", 0)

    def __post_init__(self):
        # caught here, at parse time, not hours later at the first eval or checkpoint
        positive = ("max_steps", "batch_size", "grad_accum", "eval_batch_size", "ckpt_every", "keep_last", "log_every",
                    "max_bad_steps", "prefetch")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip", "eval_every", "stop_at_step"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        _check_precision(self.precision)
        network_checks = getattr(super(), "__post_init__", None)   # the network config's own checks
        if network_checks is not None:
            network_checks()


@dataclasses.dataclass(frozen=True)
class VQGANTrainConfig(TrainConfig, VQGANConfig):
    """Stage 1: the VQGAN, its discriminator, losses and schedule."""
    data: str = _help("image shard folder made by shardify.py", "")
    flip: bool = _help("random horizontal flips", True)
    l1_weight: float = _help("weight of the L1 reconstruction term", 1.0)
    perceptual_weight: float = _help("weight of the LPIPS term (0: off, no VGG weights needed)", 1.0)
    lpips_weights: str = _help("path to vgg16-397923af.pth (default: the torch hub cache)", "")
    lpips_random_backbone: bool = _help("LPIPS with a RANDOM VGG backbone, for offline smoke runs only", False)
    disc_start: int = _help("step at which the discriminator and the GAN term start", 2000)
    disc_weight: float = _help("scale of the GAN term", 0.8)
    adaptive_disc_weight: bool = _help("scale the GAN term by ||grad L_rec|| / ||grad L_G|| on the last layer", True)
    disc_weight_max: float = _help("clamp of the adaptive weight", 1e4)
    disc_lr: float = _help("discriminator learning rate (0: same as --lr)", 0.0)
    channels_last: bool = _help("channels_last memory format (CUDA)", False)

VQGAN_TRAIN_PRESETS = {
    # disc_weight 0.1: at this scale (and with the offline random LPIPS backbone) 0.8 lets GAN noise win
    "tiny": VQGANTrainConfig(**dataclasses.asdict(VQGAN_PRESETS["tiny"]), batch_size=16, lr=5e-4,
                             warmup_steps=100, max_steps=2000, disc_start=1000, disc_weight=0.1, eval_every=500,
                             ckpt_every=500, eval_batch_size=100, out="runs/vqgan-tiny"),
    "b64": VQGANTrainConfig(**dataclasses.asdict(VQGAN_PRESETS["b64"]), batch_size=8, lr=1e-4,
                            disc_start=10000, out="runs/vqgan-b64"),
    "seed": VQGANTrainConfig(**dataclasses.asdict(VQGAN_PRESETS["seed"]), batch_size=8, lr=4.5e-5,
                             disc_start=30000, max_steps=300000, eval_every=5000, ckpt_every=5000,
                             out="runs/vqgan-seed"),
    "f16-16384": VQGANTrainConfig(**dataclasses.asdict(VQGAN_PRESETS["f16-16384"]), batch_size=12,
                                  lr=4.5e-5, disc_start=250001, max_steps=1000000, eval_every=5000,
                                  ckpt_every=5000, out="runs/vqgan-f16-16384"),
}


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """Stage 1.5: image shards -> codebook-index token shards."""
    vqgan: str = _help("VQGAN run folder (its latest checkpoint) or checkpoint file", "")
    data: str = _help("image shard folder made by shardify.py", "")
    out: str = _help("token shard folder to write", "")
    batch_size: int = _help("images per encoder batch", 64)
    flip: bool = _help("also encode horizontally flipped training images (a second token shard set)", False)
    device: str = _help("auto, cpu or cuda", "auto")
    precision: str = _help("auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16; code lookup is always fp32", "auto")
    progress: bool = _help("show a progress bar", True)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        _check_precision(self.precision)


QUANTIZE_PRESETS: dict[str, QuantizeConfig] = {}


def subconfig_from_dict(target_cls: type[C], data: dict) -> C:
    """Build `target_cls` from the same-named entries of a saved flat config dict."""
    names = {f.name for f in dataclasses.fields(target_cls)}
    return config_from_dict(target_cls, {k: v for k, v in data.items() if k in names})


@dataclasses.dataclass(frozen=True)
class GPTTrainConfig(TrainConfig, GPTConfig):
    """Stage 2: the GPT over token grids. codebook_size is a maximum: the model takes the tokens' own
    codebook size, grid length and classes from their manifest."""
    tokens: str = _help("token shard folder made by image_quantizer.py", "")
    vqgan: str = _help("VQGAN checkpoint for sample grids (default: the one the token manifest names; sha256 checked)", "")
    sample_count: int = _help("images in the sample grid at each eval (0: no samples, no VQGAN needed)", 16)
    sample_temperature: float = _help("temperature of the eval samples", 1.0)
    sample_top_k: int = _help("top-k of the eval samples (0: off)", 0)
    beta2: float = _help("AdamW beta2", 0.95)

    def __post_init__(self):
        super().__post_init__()
        if self.sample_count < 0 or self.sample_top_k < 0 or self.sample_temperature <= 0:
            raise ValueError("--sample-count and --sample-top-k must not be negative, --sample-temperature must be "
                             f"positive; got {self.sample_count}, {self.sample_top_k}, {self.sample_temperature}")


GPT_TRAIN_PRESETS = {
    "tiny": GPTTrainConfig(**dataclasses.asdict(GPT_PRESETS["tiny"]), batch_size=32, lr=1e-3, warmup_steps=100,
                           max_steps=3000, eval_every=1000, ckpt_every=1000, weight_decay=0.01, eval_batch_size=100,
                           sample_count=16, out="runs/gpt-tiny"),
    "g256": GPTTrainConfig(**dataclasses.asdict(GPT_PRESETS["g256"]), batch_size=8, lr=3e-4, warmup_steps=1000,
                           max_steps=100000, weight_decay=0.01, eval_every=2000, ckpt_every=2000, out="runs/gpt-g256"),
    "seed": GPTTrainConfig(**dataclasses.asdict(GPT_PRESETS["seed"]), batch_size=16, lr=3e-4, warmup_steps=2000,
                           max_steps=300000, weight_decay=0.01, eval_every=5000, ckpt_every=5000, out="runs/gpt-seed"),
}
