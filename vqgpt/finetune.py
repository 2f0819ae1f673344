"""--init-from: a new VQGAN run that starts from the weights of another one (imported, exported or our own).

The networks (and the discriminator, when the source has one) are loaded; optimizers, step and
data order start fresh. Every network setting the user did not give is the source's; one the
user gave (a flag or a preset) is kept where it only steers training, and refused where it would
change the architecture.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from models.vqgan import VQGANConfig
from vqgpt.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from vqgpt.config import ConfigError, flag_name, given_settings, subconfig_from_dict
from vqgpt.export import is_exported, load_exported

# VQGANConfig fields a fine-tune may change: they shape no tensor
TRAINING_FIELDS = ("beta", "vq_loss", "dead_code_steps", "dropout")
DISCRIMINATOR_FIELDS = ("disc_layers", "disc_ndf")


@dataclass
class InitSource:
    path: Path
    config: VQGANConfig
    vqgan: dict
    discriminator: dict | None


def load_init_source(path: str | Path) -> InitSource:
    """The VQGAN (and discriminator) of a run folder, checkpoint file or exported folder."""
    if is_exported(path):
        exported = load_exported(path, "vqgan")
        return InitSource(exported.path, exported.config, exported.model.state_dict(), None)
    checkpoint = resolve_checkpoint(path)
    state = load_checkpoint(checkpoint, required_keys=("stage", "config"), mmap=True)   # weights read when loaded
    if state["stage"] != "vqgan" or "vqgan" not in state:
        raise CheckpointError(f"{checkpoint}: is a {state['stage']!r} checkpoint; --init-from takes a VQGAN")
    return InitSource(checkpoint, subconfig_from_dict(VQGANConfig, state["config"]), state["vqgan"],
                      state.get("discriminator"))


def adopt_architecture(cfg, source: InitSource):
    """`cfg` with the source's VQGANConfig values where the user gave none; a setting the user gave that would
    change the architecture raises ConfigError."""
    given = given_settings(cfg)
    free = TRAINING_FIELDS + (DISCRIMINATOR_FIELDS if source.discriminator is None else ())
    adopted, conflicts = {}, []
    for f in dataclasses.fields(VQGANConfig):
        mine, theirs = getattr(cfg, f.name), getattr(source.config, f.name)
        if mine == theirs:
            continue
        if f.name not in given:
            adopted[f.name] = theirs
        elif f.name not in free:
            conflicts.append(f"{flag_name(f.name)} {_shown(mine)} (the source has {_shown(theirs)})")
    if conflicts:
        raise ConfigError(f"--init-from {source.path}: the architecture comes from the source; drop "
                          f"{'; '.join(conflicts)} (and a --preset that sets them)")
    return dataclasses.replace(cfg, **adopted)


def _shown(value) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)
