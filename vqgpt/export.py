"""Exported models: a folder with config.json, model.safetensors (weights only, no pickle) and a model card.

`export_run` writes one from a VQGAN or GPT checkpoint (or a run's latest); `load_exported` reads
it back, checking every tensor against the config; `from_pretrained` returns its model. Every
`--vqgan` / `--gpt` option takes such a folder.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from models.gpt import GPT, GPTConfig
from models.vqgan import VQGAN, VQGANConfig, count_parameters
from vqgpt.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from vqgpt.config import config_to_dict, subconfig_from_dict
from vqgpt.ema import ema_key
from vqgpt.errors import RunError, first_line
from vqgpt.files import atomic_path, atomic_write_bytes, atomic_write_json, file_inside, sha256_file
from vqgpt.runlog import METRICS_NAME, read_metrics, read_run_config

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
FORMAT = "vqgpt-export-1"
MODELS = {"vqgan": (VQGAN, VQGANConfig), "gpt": (GPT, GPTConfig)}


@dataclass
class Exported:
    model: torch.nn.Module
    config: VQGANConfig | GPTConfig
    info: dict      # config.json: stage, config, source (checkpoint, sha256, step), metrics, data, token_manifest
    path: Path      # the weights file

    @property
    def source_sha256(self) -> str:
        """The sha256 of the checkpoint it was exported from: token sets bound to it accept the export too."""
        return self.info["source"]["sha256"]


def is_exported(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / WEIGHTS_NAME).is_file()


def ensure_fresh_folder(out: str | Path, flag: str = "--out") -> Path:
    """`out` must be absent or empty: nothing in it (a run's checkpoints above all) is ever overwritten."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunError(f"{flag} {out}: already exists and is not empty; choose a new folder (nothing was written)")
    return out


def from_pretrained(folder: str | Path) -> VQGAN | GPT:
    """The VQGAN or GPT of a folder written by export.py, in eval mode without grads."""
    try:
        stage = json.loads((Path(folder) / CONFIG_NAME).read_text()).get("stage")
    except (OSError, ValueError, AttributeError):
        stage = None   # load_exported says what is wrong with the file
    return load_exported(folder, stage if stage in MODELS else "vqgan").model


def load_exported(folder: str | Path, stage: str) -> Exported:
    """The model of an exported folder, in eval mode without grads; one-line CheckpointError when unusable."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    try:
        info = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{config_path}: not a readable export config ({type(err).__name__})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or "config" not in info:
        raise CheckpointError(f"{config_path}: not a config.json written by export.py")
    if info.get("stage") != stage:
        raise CheckpointError(f"{folder}: holds a {info.get('stage')!r} model, not a {stage.upper()}")
    source = info.get("source")
    if not (isinstance(source, dict) and isinstance(source.get("sha256"), str) and isinstance(source.get("step"), int)):
        raise CheckpointError(f"{config_path}: its source (checkpoint sha256 and step) is missing or malformed")
    if "weights_sha256" in info and sha256_file(weights_path) != info["weights_sha256"]:   # older exports lack it
        raise CheckpointError(f"{weights_path}: not the file export.py wrote (sha256 differs from config.json's "
                              "weights_sha256); tokens bound to this export would decode with other weights")
    model_cls, config_cls = MODELS[stage]
    try:
        config = subconfig_from_dict(config_cls, info["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{config_path}: config does not fit this version ({err})") from None
    model = model_cls(config)
    try:
        load_model(model, weights_path, strict=True)
    except Exception as err:   # truncated file, missing keys, wrong shapes
        raise CheckpointError(f"{weights_path}: does not hold this model's weights "
                              f"({type(err).__name__}: {_last_line(err)})") from None
    model.eval().requires_grad_(False)
    return Exported(model, config, info, weights_path)


def load_stage_model(path_or_run: str | Path, stage: str, device: torch.device | str = "cpu",
                     weights: str = "ema") -> tuple:
    """The `stage` ('vqgan' or 'gpt') network of a checkpoint or a run's latest, in eval mode without grads:
    (model, config, checkpoint path, the whole state, the weights loaded: 'ema' or 'raw'). weights 'ema' takes
    the weight EMA when the checkpoint holds one. The file is memory-mapped: optimizer moments and the
    discriminator are never read."""
    path = resolve_checkpoint(path_or_run)
    state = load_checkpoint(path, required_keys=("stage", "config"), mmap=True)
    if state["stage"] != stage or stage not in state:
        raise CheckpointError(f"{path}: is a {state.get('stage')!r} checkpoint, not a {stage.upper()}")
    if "step" not in state:
        raise CheckpointError(f"{path}: not the right kind of checkpoint (missing step)")
    model_cls, config_cls = MODELS[stage]
    config = subconfig_from_dict(config_cls, state["config"])
    model = model_cls(config)
    used = "ema" if weights == "ema" and ema_key(stage) in state else "raw"
    try:
        model.load_state_dict(state[ema_key(stage) if used == "ema" else stage])
    except (RuntimeError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: its {stage} weights do not fit its config ({first_line(err)})") from None
    model.to(device).eval().requires_grad_(False)
    return model, config, path, state, used


def export_run(source: str | Path, out: str | Path, weights: str = "ema") -> Path:
    """Write config.json, model.safetensors and README.md for the VQGAN or GPT in `source` into `out`
    (its weight EMA when it has one and `weights` is 'ema'; config.json's `weights` says which)."""
    path = resolve_checkpoint(source)
    out = ensure_fresh_folder(out)
    stage = load_checkpoint(path, required_keys=("stage",), mmap=True)["stage"]
    if stage not in MODELS:
        raise CheckpointError(f"{path}: a {stage!r} checkpoint; export.py takes VQGAN and GPT checkpoints")
    model, config, path, state, used = load_stage_model(path, stage, weights=weights)
    run_dir = path.parent
    info = {"format": FORMAT, "stage": stage, "config": config_to_dict(config), "weights": used,
            "source": {"checkpoint": str(path.resolve()), "sha256": sha256_file(path), "step": int(state["step"])},
            "metrics": _last_eval(run_dir), "data": _data_of(run_dir, state)}
    if stage == "gpt":
        info["token_manifest"] = state.get("token_manifest", {})
    if "imported_from" in state:
        info["imported_from"] = state["imported_from"]
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_model(model, str(tmp), metadata={"format": FORMAT, "stage": stage})   # shared (tied) tensors once
    # tokens bound to the source checkpoint's sha256 accept this folder: its weights must be the ones written here
    info["weights_sha256"] = sha256_file(out / WEIGHTS_NAME)
    atomic_write_bytes(out / CARD_NAME, model_card(info, count_parameters(model)).encode())
    atomic_write_json(out / CONFIG_NAME, info)   # last: a folder with config.json is complete
    return out


def _last_eval(run_dir: Path) -> dict:
    records = [r for r in read_metrics(run_dir) if r.get("kind") == "eval"] \
        if file_inside(run_dir, METRICS_NAME, RunError).is_file() else []
    return records[-1] if records else {}


def _data_of(run_dir: Path, state: dict) -> str:
    if state["stage"] == "gpt":
        return str(state["config"].get("tokens", ""))
    run_config = read_run_config(run_dir, CONFIG_NAME) or {}
    return str(run_config.get("image_shards", state["config"].get("data", "")))


def model_card(info: dict, parameters: int) -> str:
    stage = info["stage"]
    metrics = {k: v for k, v in info["metrics"].items() if k not in ("kind",)}
    lines = [f"# vqgpt {stage.upper()}", "",
             f"{parameters / 1e6:.2f}M parameters, exported from `{info['source']['checkpoint']}` "
             f"(step {info['source']['step']}, sha256 `{info['source']['sha256'][:16]}...`), "
             f"{'its weight EMA' if info.get('weights') == 'ema' else 'the trained weights'}.", "",
             "```python", "from vqgpt.export import from_pretrained",
             "model = from_pretrained(\"PATH/TO/THIS/FOLDER\")", "```", "",
             "## Config", "", "```json", json.dumps(info["config"], indent=2), "```", "",
             "## Metrics (last evaluation of the run)", "",
             ("\n".join(f"- {k}: {v}" for k, v in metrics.items()) if metrics else "none recorded"), "",
             "## Data", "", info["data"] or "not recorded"]
    if "imported_from" in info:
        lines += ["", "## Source", "", f"imported from {info['imported_from'].get('format')} checkpoint "
                  f"`{info['imported_from'].get('checkpoint')}`"]
    return "\n".join(lines) + "\n"


def _last_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[-1].strip() if text else "no details"
