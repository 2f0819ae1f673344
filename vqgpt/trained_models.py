"""Load trained models for inference (quantizer, GPT evaluation, sampling, notebooks), compiled if asked."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from models.gpt import GPT, GPTConfig
from models.vqgan import VQGAN, VQGANConfig
from vqgpt.errors import RunError
from vqgpt.export import is_exported, load_exported, load_stage_model
from vqgpt.files import sha256_file


@dataclass
class LoadedVQGAN:
    model: VQGAN
    config: VQGANConfig
    path: Path
    sha256: str
    step: int
    weights: str = "raw"   # 'ema': the checkpoint's weight EMA; tokens record which weights made them


def load_vqgan(path_or_run: str | Path, device: torch.device | str = "cpu", weights: str = "ema") -> LoadedVQGAN:
    """The VQGAN of a checkpoint, a run's latest or an exported folder, in eval mode, with the file's sha256
    (an export's is that of the checkpoint it was made from: the same weights, the same tokens). weights 'ema':
    the weight EMA when the checkpoint holds one (an export holds the one it was made with)."""
    if is_exported(path_or_run):
        exported = load_exported(path_or_run, "vqgan")
        return LoadedVQGAN(exported.model.to(device), exported.config, exported.path, exported.source_sha256,
                           int(exported.info["source"]["step"]), exported.info.get("weights", "raw"))
    model, config, path, state, used = load_stage_model(path_or_run, "vqgan", device, weights)
    return LoadedVQGAN(model, config, path, sha256_file(path), int(state["step"]), used)


def load_bound_vqgan(token_manifest: dict, override_path: str = "", device: torch.device | str = "cpu",
                     tokens_name: str = "the tokens") -> LoadedVQGAN:
    """The VQGAN that made a token set; any other checkpoint is refused (its codes mean other things)."""
    path = override_path or token_manifest.get("vqgan_checkpoint", "")
    if not path or not Path(path).exists():
        raise RunError(f"the VQGAN checkpoint {path!r} that made {tokens_name} is missing; "
                       "pass --vqgan PATH to a copy of it")
    made_with = token_manifest.get("vqgan_weights", "raw")   # token sets older than the weight EMA: raw
    vqgan = load_vqgan(path, device, made_with)
    if vqgan.sha256 != token_manifest.get("vqgan_sha256"):
        raise RunError(f"{vqgan.path}: sha256 {vqgan.sha256[:12]}... is not the checkpoint that made {tokens_name} "
                       f"({str(token_manifest.get('vqgan_sha256'))[:12]}...); decode with that one or re-quantize")
    check_token_claims(token_manifest, vqgan, tokens_name)
    if vqgan.weights != made_with:
        raise RunError(f"{vqgan.path}: holds the VQGAN's {vqgan.weights} weights, but {tokens_name} were made with its "
                       f"{made_with} weights; decode with those (export.py --weights {made_with}) or re-quantize")
    return vqgan


def check_token_claims(token_manifest: dict, vqgan: LoadedVQGAN, tokens_name: str = "the tokens") -> None:
    """The codebook size and grid a token manifest claims are its VQGAN's: a GPT sized or shaped by other claims
    would sample ids the VQGAN cannot decode, or images cut into the wrong rows."""
    grid = token_manifest.get("latent_grid")
    if grid is None or "codebook_size" not in token_manifest:
        raise RunError(f"the manifest of {tokens_name} lacks its latent_grid or codebook_size; re-make the tokens "
                       "with image_quantizer.py")
    claims = {"codebook_size": token_manifest["codebook_size"], "latent_grid": grid}
    actual = {"codebook_size": vqgan.config.codebook_size, "latent_grid": list(vqgan.model.latent_grid)}
    wrong = [f"{key} {str(claims[key])[:40]} (the VQGAN's: {actual[key]})" for key in claims if claims[key] != actual[key]]
    if wrong:
        raise RunError(f"the manifest of {tokens_name} claims {', '.join(wrong)} for {vqgan.path}; "
                       "re-quantize with image_quantizer.py")


@dataclass
class LoadedGPT:
    model: GPT
    config: GPTConfig
    token_manifest: dict
    path: Path
    step: int
    weights: str = "raw"


def load_gpt(path_or_run: str | Path, device: torch.device | str = "cpu", weights: str = "ema") -> LoadedGPT:
    """The GPT of a checkpoint, a run's latest or an exported folder, in eval mode, with the manifest of its tokens;
    weights 'ema': its weight EMA when it holds one."""
    if is_exported(path_or_run):
        exported = load_exported(path_or_run, "gpt")
        return LoadedGPT(exported.model.to(device), exported.config, exported.info.get("token_manifest", {}),
                         exported.path, int(exported.info["source"]["step"]), exported.info.get("weights", "raw"))
    model, config, path, state, used = load_stage_model(path_or_run, "gpt", device, weights)
    return LoadedGPT(model, config, state.get("token_manifest", {}), path, int(state["step"]), used)


def optimize_for_inference(model: VQGAN | GPT, *, compile: bool = False, channels_last: bool = False) -> VQGAN | GPT:
    """The model in place, in channels_last memory format (a VQGAN's convolutions) and/or with its entry points
    compiled. torch.compile(module) would compile forward only, so each method inference calls is replaced by
    its compiled self; a GPT's forward is compiled for dynamic lengths, as its KV cache grows a position a step."""
    if channels_last and isinstance(model, VQGAN):
        model.to(memory_format=torch.channels_last)
    if compile:
        methods = ("forward", "encode_to_indices", "decode_indices") if isinstance(model, VQGAN) else ("forward",)
        for name in methods:   # compiled on first call: a method never called costs nothing
            setattr(model, name, torch.compile(getattr(model, name), dynamic=True if isinstance(model, GPT) else None))
    return model
