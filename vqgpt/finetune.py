"""--init-from: a new VQGAN or GPT run that starts from the weights of another one (imported, exported or our own).

The networks (and the discriminator, when the source has one) are loaded; optimizers, step and
data order start fresh. Every network setting the user did not give is the source's; one the
user gave (a flag or a preset) is kept where it only steers training, and refused where it would
change the architecture.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

from models.gpt import GPTConfig
from models.vqgan import VQGANConfig
from vqgpt import distributed
from vqgpt.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from vqgpt.config import ConfigError, flag_name, given_settings, subconfig_from_dict
from vqgpt.export import is_exported, load_exported
from vqgpt.runlog import require_wandb

# VQGANConfig fields a fine-tune may change: they shape no tensor
TRAINING_FIELDS = ("beta", "vq_loss", "dead_code_steps", "dropout")
DISCRIMINATOR_FIELDS = ("disc_layers", "disc_ndf")
GPT_TRAINING_FIELDS = ("dropout", "label_dropout", "token_dropout", "drop_path")
# GPTConfig fields the trainer takes from the token manifest: the source must fit the tokens
GPT_TOKEN_FIELDS = ("codebook_size", "n_classes", "tokens_per_image")


@dataclass
class InitSource:
    path: Path
    config: VQGANConfig
    vqgan: dict
    discriminator: dict | None


def _read_source(path: str | Path, stage: str, config_cls: type) -> tuple[Path, object, dict, dict]:
    """(file, config, weights, checkpoint state) of a run folder, checkpoint file or exported folder of `stage`."""
    if is_exported(path):
        exported = load_exported(path, stage)
        return exported.path, exported.config, exported.model.state_dict(), {}
    checkpoint = resolve_checkpoint(path)
    state = load_checkpoint(checkpoint, required_keys=("stage", "config"), mmap=True)   # weights read when loaded
    if state["stage"] != stage or stage not in state:
        raise CheckpointError(f"{checkpoint}: is a {state['stage']!r} checkpoint; --init-from takes a "
                              f"{stage.upper()}")
    return checkpoint, subconfig_from_dict(config_cls, state["config"]), state[stage], state


def load_init_source(path: str | Path) -> InitSource:
    """The VQGAN (and discriminator) of a run folder, checkpoint file or exported folder."""
    checkpoint, config, weights, state = _read_source(path, "vqgan", VQGANConfig)
    return InitSource(checkpoint, config, weights, state.get("discriminator"))


@dataclass
class GPTInitSource:
    path: Path
    config: GPTConfig
    gpt: dict


def load_gpt_init_source(path: str | Path) -> GPTInitSource:
    """The GPT of a run folder (an imported one too), checkpoint file or exported folder."""
    checkpoint, config, weights, _ = _read_source(path, "gpt", GPTConfig)
    return GPTInitSource(checkpoint, config, weights)


def adopt_architecture(cfg, source: InitSource):
    """`cfg` with the source's VQGANConfig values where the user gave none; a setting the user gave that would
    change the architecture raises ConfigError."""
    free = TRAINING_FIELDS + (DISCRIMINATOR_FIELDS if source.discriminator is None else ())
    return _adopt(cfg, source.config, source.path, VQGANConfig, free)


def adopt_gpt_architecture(cfg, source: GPTInitSource):
    """The same for a GPT; codebook size, classes and grid come from the tokens (check_fits_tokens)."""
    return _adopt(cfg, source.config, source.path, GPTConfig, GPT_TRAINING_FIELDS, skip=GPT_TOKEN_FIELDS)


def check_fits_tokens(cfg, source: GPTInitSource) -> None:
    """The tokens' codebook size, classes and grid (now in cfg) must be the source GPT's."""
    differing = [f"{name} {getattr(cfg, name)} (the source has {getattr(source.config, name)})"
                 for name in GPT_TOKEN_FIELDS if getattr(cfg, name) != getattr(source.config, name)]
    if differing:
        raise ConfigError(f"--init-from {source.path}: the tokens have {'; '.join(differing)}; fine-tune on tokens "
                          "of the same VQGAN, classes and grid")


def _adopt(cfg, source_config, source_path: Path, config_cls: type, free: tuple[str, ...], skip: tuple[str, ...] = ()):
    given = given_settings(cfg)
    adopted, conflicts = {}, []
    for f in dataclasses.fields(config_cls):
        mine, theirs = getattr(cfg, f.name), getattr(source_config, f.name)
        if mine == theirs or f.name in skip:
            continue
        if f.name not in given:
            adopted[f.name] = theirs
        elif f.name not in free:
            conflicts.append(f"{flag_name(f.name)} {_shown(mine)} (the source has {_shown(theirs)})")
    if conflicts:
        raise ConfigError(f"--init-from {source_path}: the architecture comes from the source; drop "
                          f"{'; '.join(conflicts)} (and a --preset that sets them)")
    return dataclasses.replace(cfg, **adopted)


def _shown(value) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


def launch_trainer(train, cfg, load_source, adopt) -> int:
    """A trainer's main: --wandb checked, the --init-from source read (tensors memory-mapped until loaded) and its
    architecture adopted, all before any process group; then `train(cfg, dist, init=source)` under torchrun's ranks."""
    require_wandb(cfg.wandb)
    init = load_source(cfg.init_from) if cfg.init_from else None
    if init is not None:
        cfg = adopt(cfg, init)
    return distributed.launch(functools.partial(train, init=init), cfg)
