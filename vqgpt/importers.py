"""Published VQ tokenizers as runs of this project: taming-transformers VQGANs and LlamaGen VQ models.

Both use the same blocks as ours (GroupNorm(32, eps 1e-6), swish, single-head attention, nearest
x2 + conv upsampling, right/bottom-padded strided downsampling); only the names differ. The
plan walks our VQGAN's blocks and names the source tensor of each of ours (q, k and v are
concatenated into our qkv), so every tensor of ours has exactly one source: a missing or
mis-shaped one stops the import, and every source tensor left over is reported as ignored.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from models.discriminator import NLayerDiscriminator
from models.layers import AttnBlock
from models.vqgan import VQGAN, VQGANConfig, most_disc_layers
from vqgpt.checkpoint import CheckpointError, save_checkpoint
from vqgpt.config import ConfigError, config_from_dict, config_to_dict
from vqgpt.export import ensure_fresh_folder
from vqgpt.files import atomic_path, atomic_write_json, sha256_file
from vqgpt.safe_pickle import load_foreign_checkpoint

LPIPS_VGG_NAME = "lpips_vgg16.pth"    # torchvision VGG16 `features.N.*`, for --lpips-weights
MODEL_PREFIXES = ("encoder.", "decoder.", "quantize.", "quant_conv.", "post_quant_conv.")
# our tensors no source has: the dead-code counters start at zero
FRESH_KEYS = ("quantizer.steps_unused",)


@dataclass
class ImportedVQGAN:
    config: VQGANConfig
    vqgan: dict
    discriminator: dict | None
    lpips_vgg: dict | None
    ignored: dict[str, str] = field(default_factory=dict)   # source key -> why it is not used
    source: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Layout:
    """Where a source keeps the tensors of our blocks (`level` is our level index, lowest resolution
    last in the encoder and first in the decoder, as in our Encoder and Decoder)."""
    name: str
    mid: tuple[str, str, str]

    def block(self, part: str, level: int, levels: int, kind: str, index: int) -> str:
        if self.name == "taming":   # taming indexes decoder levels by resolution, highest first
            source_level = level if part == "encoder" else levels - 1 - level
            group = "down" if part == "encoder" else "up"
            return f"{part}.{group}.{source_level}.{'block' if kind == 'res' else 'attn'}.{index}"
        return f"{part}.conv_blocks.{level}.{kind}.{index}"

    def resample(self, part: str, level: int, levels: int) -> str:
        name = "downsample" if part == "encoder" else "upsample"
        if self.name == "taming":
            source_level = level if part == "encoder" else levels - 1 - level
            return f"{part}.{'down' if part == 'encoder' else 'up'}.{source_level}.{name}"
        return f"{part}.conv_blocks.{level}.{name}"


TAMING = Layout("taming", ("mid.block_1", "mid.attn_1", "mid.block_2"))
LLAMAGEN = Layout("llamagen", ("mid.0", "mid.1", "mid.2"))


def tensor_plan(model: VQGAN, layout: Layout) -> dict[str, list[str]]:
    """Our state-dict key -> the source keys it is made of (three for an attention qkv)."""
    pairs: list[tuple[str, str, nn.Module]] = []
    for part_name in ("encoder", "decoder"):
        part = getattr(model, part_name)
        levels = len(part.levels)
        for level, stage in enumerate(part.levels):
            counts = {"res": 0, "attn": 0}
            for position, block in enumerate(stage.blocks):
                kind = "attn" if isinstance(block, AttnBlock) else "res"
                pairs.append((f"{part_name}.levels.{level}.blocks.{position}",
                              layout.block(part_name, level, levels, kind, counts[kind]), block))
                counts[kind] += 1
            resample = stage.downsample if part_name == "encoder" else stage.upsample
            if not isinstance(resample, nn.Identity):
                pairs.append((f"{part_name}.levels.{level}.{'downsample' if part_name == 'encoder' else 'upsample'}",
                              layout.resample(part_name, level, levels), resample))
        for index, block in enumerate(part.mid):
            pairs.append((f"{part_name}.mid.{index}", f"{part_name}.{layout.mid[index]}", block))
        for name in ("conv_in", "norm_out", "conv_out"):
            pairs.append((f"{part_name}.{name}", f"{part_name}.{name}", getattr(part, name)))
    pairs += [("quant_conv", "quant_conv", model.quant_conv), ("post_quant_conv", "post_quant_conv", model.post_quant_conv)]
    plan = {}
    for ours, theirs, module in pairs:
        for key in module.state_dict():
            if key.startswith("qkv."):
                plan[f"{ours}.{key}"] = [f"{theirs}.{head}.{key[4:]}" for head in ("q", "k", "v")]
            elif key.startswith("skip."):
                plan[f"{ours}.{key}"] = [f"{theirs}.nin_shortcut.{key[5:]}"]
            else:
                plan[f"{ours}.{key}"] = [f"{theirs}.{key}"]
    plan["quantizer.codebook"] = ["quantize.embedding.weight"]
    return plan


def check_tensors(state: dict, path: Path, prefix: str = "") -> dict:
    """A state dict as a source must hold one: names to tensors (a crafted or damaged file: one line, not a
    traceback wherever a shape is read)."""
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: {prefix}holds the key {key!r}, not a name: not a state dict of a model")
        if not torch.is_tensor(value):
            raise CheckpointError(f"{path}: {prefix}{key!r} holds {type(value).__name__}, not a tensor: not a "
                                  "state dict of a model")
    return state


def _dims(source: dict, key: str, ndim: int, path: Path, why: str) -> tuple[int, ...]:
    """The shape of a tensor whose sizes give an architecture: ndim sizes, none of them 0."""
    if key not in source:
        raise CheckpointError(f"{path}: missing key {key}: {why}")
    shape = tuple(source[key].shape)
    if len(shape) != ndim or 0 in shape:
        raise CheckpointError(f"{path}: key {key} has shape {shape}; {why} needs {ndim} non-zero sizes")
    return shape


def take_tensor(source: dict, key: str, shape: tuple, path: Path, origin: str) -> torch.Tensor:
    if key not in source:
        raise CheckpointError(f"{path}: missing key {key} (needed by the model {origin} describes)")
    value = source[key]
    if not torch.is_tensor(value) or tuple(value.shape) != tuple(shape):
        found = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
        raise CheckpointError(f"{path}: key {key} has shape {found}, but the model {origin} describes needs {tuple(shape)}")
    return value.float() if value.is_floating_point() else value   # fp16/bf16 releases become fp32


def map_vqgan(config: VQGANConfig, source: dict, layout: Layout, path: Path, origin: str) -> tuple[dict, set[str]]:
    """Our VQGAN state dict from the source's tensors, checked strictly; and the source keys used."""
    model = VQGAN(config)
    ours = model.state_dict()
    state, used = {}, set()
    for key, source_keys in tensor_plan(model, layout).items():
        shape = list(ours[key].shape)
        if len(source_keys) == 3:
            shape[0] //= 3
        parts = [take_tensor(source, k, shape, path, origin) for k in source_keys]
        state[key] = torch.cat(parts) if len(parts) > 1 else parts[0]
        used.update(source_keys)
    for key in FRESH_KEYS:
        state[key] = ours[key]
    unplanned = sorted(set(ours) - set(state))
    if unplanned:   # a config option this importer does not map (EMA buffers, ...)
        raise CheckpointError(f"{path}: no source for {', '.join(unplanned)}")
    model.load_state_dict(state)   # strict: every key, every shape
    return state, used


def discriminator_from(source: dict, prefix: str, path: Path) -> tuple[dict, int, int] | None:
    """A PatchGAN discriminator's state (and its ndf, n_layers) from `prefix`main.* keys; None when absent."""
    state = {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)}
    if not state:
        return None
    ndf = _dims(state, "main.0.weight", 4, path, f"{prefix or '[discriminator] '}as a PatchGAN discriminator")[0]
    n_layers = sum(1 for k in state if k.endswith("running_mean"))
    discriminator = NLayerDiscriminator(3, ndf, n_layers)
    expected = discriminator.state_dict()
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise CheckpointError(f"{path}: {prefix}* does not fit a PatchGAN of {n_layers} layers, ndf {ndf} "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(f"{path}: key {prefix}{key} has shape {tuple(state[key].shape)}, "
                                  f"a PatchGAN of {n_layers} layers, ndf {ndf} needs {tuple(value.shape)}")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    discriminator.load_state_dict(state)
    return state, ndf, n_layers


def model_state(checkpoint, path: Path, names: tuple[str, ...], marker: str = "encoder.conv_in.weight") -> tuple[dict, str]:
    """The state dict under the first of `names` present, or the checkpoint itself when it holds `marker`."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: holds a {type(checkpoint).__name__}, not a checkpoint dict")
    for name in names:
        if isinstance(checkpoint.get(name), dict):
            return check_tensors(checkpoint[name], path, f"[{name}] "), name
    if marker in checkpoint:
        return check_tensors(checkpoint, path), ""
    raise CheckpointError(f"{path}: no model weights (none of the keys {', '.join(names)})")


def unused_keys(source: dict, used: set[str], path: Path, reasons: dict[str, str],
               model_prefixes: tuple[str, ...] = MODEL_PREFIXES, other: str = "not part of the VQGAN") -> dict[str, str]:
    """Source keys not used: allowed ones with their reason (`other` outside `model_prefixes`); unknown keys of the
    model itself stop the import, all of them listed."""
    ignored, unknown = {}, []
    for key in sorted(set(source) - used):
        reason = next((why for prefix, why in reasons.items() if key.startswith(prefix)), None)
        if reason is None and key.startswith(model_prefixes):
            unknown.append(key)
        ignored[key] = reason or other
    if unknown:
        raise CheckpointError(f"{path}: unexpected keys, not part of the model layout this importer knows: "
                              f"{', '.join(unknown[:8])}{f' and {len(unknown) - 8} more' if len(unknown) > 8 else ''}")
    return ignored


def read_taming_yaml(path: str | Path) -> dict:
    """model.params of taming's model.yaml, checked for what our VQGAN can be."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
        params = data["model"]["params"]
        ddconfig = params["ddconfig"]
    except OSError as err:
        raise ConfigError(f"--config {path}: cannot be read ({err.strerror})") from None
    except (yaml.YAMLError, KeyError, TypeError) as err:
        raise ConfigError(f"--config {path}: not taming's model.yaml ({type(err).__name__}: {err})") from None
    missing = [k for k in ("embed_dim", "n_embed") if k not in params] + [
        f"ddconfig.{k}" for k in ("z_channels", "resolution", "ch", "ch_mult", "num_res_blocks", "attn_resolutions")
        if k not in ddconfig]
    if missing:
        raise ConfigError(f"--config {path}: model.params lacks {', '.join(missing)}")
    target = data["model"].get("target", "taming.models.vqgan.VQModel")
    if target != "taming.models.vqgan.VQModel":
        raise ConfigError(f"--config {path}: model.target {target} is not supported; only taming.models.vqgan.VQModel "
                          "(GumbelVQ and EMAVQ quantize differently)")
    unsupported = {"double_z": (ddconfig.get("double_z", True), False), "in_channels": (ddconfig.get("in_channels", 3), 3),
                   "out_ch": (ddconfig.get("out_ch", 3), 3), "resamp_with_conv": (ddconfig.get("resamp_with_conv", True), True),
                   "remap": (params.get("remap"), None)}
    for name, (value, wanted) in unsupported.items():
        if value != wanted:
            raise ConfigError(f"--config {path}: {name}: {value!r} is not supported (only {wanted!r})")
    return params


def import_taming(ckpt_path: str | Path, yaml_path: str | Path) -> ImportedVQGAN:
    """taming-transformers' VQModel (Lightning last.ckpt + model.yaml)."""
    path = Path(ckpt_path)
    params = read_taming_yaml(yaml_path)
    ddconfig = params["ddconfig"]
    checkpoint = load_foreign_checkpoint(path)
    source, container = model_state(checkpoint, path, ("state_dict",))
    if "quantize.embed.weight" in source:
        raise CheckpointError(f"{path}: a GumbelQuantize checkpoint; only VectorQuantizer VQGANs are supported")
    disc = discriminator_from(source, "loss.discriminator.", path)
    try:   # checked as a saved config is (types, ranges), then as a network
        resolution = ddconfig["resolution"]
        # without a PatchGAN the fine-tune starts one: taming's 3 layers where the image fits them
        ndf, n_layers = (disc[1], disc[2]) if disc else (64, min(3, most_disc_layers(resolution)))
        config = config_from_dict(VQGANConfig, dict(
            image_size=resolution, ch=ddconfig["ch"], ch_mult=ddconfig["ch_mult"],
            num_res_blocks=ddconfig["num_res_blocks"], attn_resolutions=ddconfig["attn_resolutions"],
            z_channels=ddconfig["z_channels"], dropout=float(ddconfig.get("dropout", 0.0)),
            codebook_size=params["n_embed"], codebook_dim=params["embed_dim"], quantizer="vq", beta=0.25,
            vq_loss="taming", quant_conv_to_codebook=params["embed_dim"] != ddconfig["z_channels"],
            disc_layers=n_layers, disc_ndf=ndf))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--config {yaml_path}: {str(err).removeprefix('saved config: ')}") from None
    state, used = map_vqgan(config, source, TAMING, path, f"--config {yaml_path}")
    lpips_vgg, lpips_used = _taming_lpips(source, path)
    used |= lpips_used
    if disc:
        used |= {"loss.discriminator." + k for k in disc[0]}
    ignored = unused_keys(source, used, path, {
        "loss.perceptual_loss.lin": "LPIPS heads: the lpips package's own (the same published v0.1 VGG heads) are used",
        "loss.perceptual_loss.scaling_layer": "LPIPS input scaling constants, built into the lpips package"})
    ignored.update({f"[{key}]": "Lightning bookkeeping" for key in checkpoint if key != container})
    return ImportedVQGAN(config, state, disc[0] if disc else None, lpips_vgg, ignored,
                         {"format": "taming", "checkpoint": str(path.resolve()), "config": str(Path(yaml_path).resolve()),
                          "sha256": sha256_file(path)})


def _taming_lpips(source: dict, path: Path) -> tuple[dict | None, set[str]]:
    """taming's LPIPS VGG16 (`loss.perceptual_loss.net.sliceK.N.*`) as torchvision's `features.N.*`."""
    prefix = "loss.perceptual_loss.net."
    keys = [k for k in source if k.startswith(prefix)]
    if not keys:
        return None, set()
    import torchvision

    with torch.device("meta"):
        expected = torchvision.models.vgg16().features.state_dict()
    features = {}
    for key in keys:
        parts = key[len(prefix):].split(".")   # sliceK, N, weight|bias
        name = ".".join(parts[1:])
        if len(parts) != 3 or name not in expected or expected[name].shape != source[key].shape:
            raise CheckpointError(f"{path}: {key} does not fit torchvision's VGG16 features.{name}")
        features[f"features.{name}"] = source[key].float()
    if len(features) != len(expected):
        raise CheckpointError(f"{path}: {prefix}* holds {len(features)} of VGG16's {len(expected)} feature tensors")
    return features, set(keys)


def infer_llamagen_config(source: dict, path: Path, image_size: int, l2_norm: bool,
                          disc: tuple | None) -> VQGANConfig:
    """LlamaGen's VQModel architecture, read from the tensor shapes (its checkpoints hold no config)."""
    why = "a LlamaGen VQ model"
    codebook_size, codebook_dim = _dims(source, "quantize.embedding.weight", 2, path, why)
    z_channels = _dims(source, "quant_conv.weight", 4, path, why)[1]
    ch = _dims(source, "encoder.conv_in.weight", 4, path, why)[0]
    # a key whose level is not a number is left to unused_keys, which refuses it by name
    levels = 1 + max((int(match[1]) for match in map(re.compile(r"encoder\.conv_blocks\.(\d+)\.").match, source)
                      if match), default=-1)
    if not levels:
        raise CheckpointError(f"{path}: no encoder.conv_blocks.*: not {why}")
    num_res_blocks = sum(1 for k in source if k.startswith("encoder.conv_blocks.0.res.") and k.endswith(".conv1.weight"))
    ch_mult = []
    for level in range(levels):
        ch_mult.append(_dims(source, f"encoder.conv_blocks.{level}.res.0.conv1.weight", 4, path, why)[0] // ch)
    try:   # LlamaGen attends at the lowest resolution, whatever the image size
        return VQGANConfig(image_size=image_size, ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
                           attn_resolutions=(image_size // 2 ** (levels - 1),), z_channels=z_channels,
                           codebook_size=codebook_size, codebook_dim=codebook_dim, quantizer="l2" if l2_norm else "vq",
                           beta=0.25, vq_loss="vqvae", quant_conv_to_codebook=codebook_dim != z_channels,
                           disc_layers=disc[2] if disc else min(3, most_disc_layers(image_size)),
                           disc_ndf=disc[1] if disc else 64)
    except ValueError as err:
        raise ConfigError(f"{path}: {err}") from None


def import_llamagen(ckpt_path: str | Path, image_size: int = 256, l2_norm: bool = True) -> ImportedVQGAN:
    """LlamaGen's VQ-8 / VQ-16 (`{"model": ...}`, or `{"ema": ...}`, with an optional PatchGAN `discriminator`)."""
    path = Path(ckpt_path)
    checkpoint = load_foreign_checkpoint(path)
    source, container = model_state(checkpoint, path, ("ema", "model", "state_dict"))
    disc_source = checkpoint.get("discriminator") if isinstance(checkpoint.get("discriminator"), dict) else {}
    if disc_source and "main.0.weight" in disc_source:   # a PatchGAN to map (another discriminator is ignored)
        check_tensors(disc_source, path, "[discriminator] ")
    disc, disc_note = None, "a StyleGAN discriminator: the fine-tune starts a fresh PatchGAN"
    if disc_source and "main.0.weight" in disc_source:
        disc = discriminator_from(disc_source, "", path)
        if disc[2] > most_disc_layers(image_size):   # its patches are larger than the image: no logit left
            disc, disc_note = None, (f"a {disc[2]}-layer PatchGAN leaves no logit at {image_size} px: the fine-tune "
                                     f"starts a fresh one that fits")
    config = infer_llamagen_config(source, path, image_size, l2_norm, disc)
    state, used = map_vqgan(config, source, LLAMAGEN, path, "the tensor shapes")
    ignored = unused_keys(source, used, path, {"quantize.codebook_used": "LlamaGen's usage statistics"})
    for key in checkpoint:
        if key == container or (key == "discriminator" and disc):
            continue
        ignored[f"[{key}]"] = disc_note if key == "discriminator" else "training bookkeeping"
    return ImportedVQGAN(config, state, disc[0] if disc else None, None, ignored,
                         {"format": "llamagen", "checkpoint": str(path.resolve()), "weights": container or "top level",
                          "sha256": sha256_file(path)})


def write_imported_folder(out: str | Path, stage: str, config: dict, networks: dict, source: dict,
                          ignored: dict[str, str], recorded: dict | None = None, files: dict | None = None) -> Path:
    """A run folder every tool takes, at step 0: `files` (torch-saved), step_00000000.pt with `networks`, latest,
    and config.json; `recorded` goes into both the checkpoint and config.json."""
    out = ensure_fresh_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, obj in (files or {}).items():
        with atomic_path(out / name) as tmp:
            torch.save(obj, tmp)
    save_checkpoint(out, 0, {"stage": stage, "step": 0, "config": config, **networks, **(recorded or {}),
                             "imported_from": source}, keep_last=1)
    atomic_write_json(out / "config.json", {"stage": stage, "config": config, "imported_from": source,
                                            **(recorded or {}), "ignored_keys": ignored})
    return out


def write_imported_run(imported: ImportedVQGAN, out: str | Path) -> Path:
    """A VQGAN run folder (and the LPIPS VGG16 beside it when the source had one)."""
    networks = {"vqgan": imported.vqgan}
    if imported.discriminator is not None:
        networks["discriminator"] = imported.discriminator
    return write_imported_folder(out, "vqgan", config_to_dict(imported.config), networks, imported.source,
                                 imported.ignored, files={} if imported.lpips_vgg is None
                                 else {LPIPS_VGG_NAME: imported.lpips_vgg})


def summarize_ignored(ignored: dict[str, str]) -> list[str]:
    """One line per reason: how many source entries it covers and the first of them."""
    groups: dict[str, list[str]] = {}
    for key, reason in ignored.items():
        groups.setdefault(reason, []).append(key)
    return [f"{len(keys)} x {reason} ({keys[0]}{', ...' if len(keys) > 1 else ''})" for reason, keys in groups.items()]
