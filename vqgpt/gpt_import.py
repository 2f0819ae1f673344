"""Published class-conditional GPTs as GPT runs of this project: LlamaGen's c2i GPT-B ... GPT-XXL.

LlamaGen's Transformer is our `arch llama` block: its tok_embeddings and the LabelEmbedder's
table (classes + the null class) are our token table, codes then classes then the start token, in
that order; wqkv, wo, w1 (gate), w3 (up), w2 (down), the RMSNorm gains and the separate output
head map one to one. The architecture is read from the tensor shapes; the head count and the token
grid leave no trace in the weights, so they come from the checkpoint's `args`, or the flags.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.gpt import GPT, GPTConfig
from vqgpt.checkpoint import CheckpointError
from vqgpt.config import ConfigError, config_to_dict
from vqgpt.files import sha256_file
from vqgpt.importers import model_state, take_tensor, unused_keys, write_imported_folder
from vqgpt.safe_pickle import StandIn, load_foreign_checkpoint

# LlamaGen's GPT_models: the head count of each name (its checkpoints' args name the model)
LLAMAGEN_HEADS = {"GPT-B": 12, "GPT-L": 16, "GPT-XL": 20, "GPT-XXL": 24, "GPT-XXXL": 40,
                  "GPT-1B": 32, "GPT-3B": 32, "GPT-7B": 32}
LLAMAGEN_IGNORED = {"freqs_cis": "rotary table, rebuilt from the config",
                    "causal_mask": "sampling mask, rebuilt when sampling"}


@dataclass
class ImportedGPT:
    config: GPTConfig
    gpt: dict
    token_manifest: dict
    ignored: dict[str, str] = field(default_factory=dict)   # source key -> why it is not used
    source: dict = field(default_factory=dict)


def llamagen_plan(config: GPTConfig) -> dict[str, str]:
    """Our state-dict key -> LlamaGen's (the token table, made of two, is mapped apart)."""
    plan = {"ln_f.weight": "norm.weight", "head.weight": "output.weight"}
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"layers.{i}."
        plan.update({ours + "ln_1.weight": theirs + "attention_norm.weight",
                     ours + "ln_2.weight": theirs + "ffn_norm.weight",
                     ours + "attn.qkv.weight": theirs + "attention.wqkv.weight",
                     ours + "attn.proj.weight": theirs + "attention.wo.weight",
                     ours + "mlp.gate.weight": theirs + "feed_forward.w1.weight",
                     ours + "mlp.up.weight": theirs + "feed_forward.w3.weight",
                     ours + "mlp.down.weight": theirs + "feed_forward.w2.weight"})
    return plan


def _args_of(checkpoint: dict) -> dict:
    """train_c2i.py's argparse.Namespace (a stand-in after safe loading) as a dict; {} without one."""
    args = checkpoint.get("args")
    if isinstance(args, StandIn):
        state = getattr(args, "state", None)
        return dict(state) if isinstance(state, dict) else {}
    return dict(args) if isinstance(args, dict) else {}


def infer_llamagen_gpt_config(source: dict, args: dict, path: Path, n_head: int, grid_size: int) -> GPTConfig:
    for key in ("tok_embeddings.weight", "cls_embedding.embedding_table.weight", "layers.0.attention.wqkv.weight"):
        if key not in source:
            raise CheckpointError(f"{path}: missing key {key}: not a LlamaGen class-conditional GPT")
    if args.get("gpt_type", "c2i") != "c2i" or args.get("cls_token_num", 1) != 1:
        raise CheckpointError(f"{path}: a {args.get('gpt_type')} GPT with {args.get('cls_token_num')} condition tokens; "
                              "only class-conditional GPTs (one class token) are supported")
    codebook_size, width = source["tok_embeddings.weight"].shape
    class_rows = source["cls_embedding.embedding_table.weight"].shape[0]
    n_classes = class_rows - 1   # the last row is the null class of guidance
    if "num_classes" in args and args["num_classes"] != n_classes:
        raise CheckpointError(f"{path}: {class_rows} class rows for {args['num_classes']} classes: trained without "
                              "class dropout (no null class), which guidance and our start token need")
    n_layer = sum(1 for key in source if key.startswith("layers.") and key.endswith(".attention.wqkv.weight"))
    n_head = n_head or LLAMAGEN_HEADS.get(args.get("gpt_model"), 0)
    if not n_head:
        raise ConfigError(f"{path}: the head count is not in the weights and its args name no known model "
                          f"({args.get('gpt_model')!r}): give --n-head")
    if not grid_size and "image_size" in args and "downsample_size" in args:
        grid_size = args["image_size"] // args["downsample_size"]
    if not grid_size:
        raise ConfigError(f"{path}: the token grid is not in the weights and the checkpoint has no args: give "
                          "--grid-size (16 for 256 px with VQ-16) or --vqgan")
    if width % n_head:
        raise ConfigError(f"{path}: width {width} is not a multiple of --n-head {n_head}")
    head_dim = width // n_head
    kv_rows = source["layers.0.attention.wqkv.weight"].shape[0] - width
    if kv_rows <= 0 or kv_rows % (2 * head_dim):
        raise ConfigError(f"{path}: wqkv has {kv_rows + width} rows, which {n_head} heads of {head_dim} cannot split "
                          "into queries, keys and values: check --n-head")
    n_kv_head = kv_rows // (2 * head_dim)
    dropout = float(args.get("dropout_p", 0.1))
    try:
        config = GPTConfig(codebook_size=codebook_size, n_classes=n_classes, tokens_per_image=grid_size ** 2,
                           n_layer=n_layer, n_head=n_head, n_embd=width, arch="llama",
                           n_kv_head=0 if n_kv_head == n_head else n_kv_head, dropout=dropout,
                           token_dropout=None if args.get("token_dropout_p", dropout) == dropout
                           else float(args["token_dropout_p"]),
                           drop_path=float(args.get("drop_path_rate", 0.0)))
    except ValueError as err:
        raise ConfigError(f"{path}: {err}") from None
    hidden = source["layers.0.feed_forward.w1.weight"].shape[0] if "layers.0.feed_forward.w1.weight" in source else 0
    if hidden != config.mlp_hidden:
        raise CheckpointError(f"{path}: feed-forward width {hidden}, but LlamaGen's rule (no ffn_dim_multiplier) gives "
                              f"{config.mlp_hidden} for width {width}; other widths are not supported")
    return config


def import_llamagen_gpt(ckpt_path: str | Path, n_head: int = 0, grid_size: int = 0, vqgan=None) -> ImportedGPT:
    """LlamaGen's c2i GPT (`{"model": ...}`, `{"ema": ...}` preferred, or a bare state dict), bound to `vqgan`
    (a LoadedVQGAN) when given: sample.py then decodes with it."""
    path = Path(ckpt_path)
    checkpoint = load_foreign_checkpoint(path)
    source, container = model_state(checkpoint, path, ("ema", "model", "module", "state_dict"),
                                     marker="tok_embeddings.weight")
    args = _args_of(checkpoint) if container else {}
    if vqgan is not None and not grid_size and "image_size" not in args:
        grid_size = math.isqrt(math.prod(vqgan.model.latent_grid))
    config = infer_llamagen_gpt_config(source, args, path, n_head, grid_size)

    with torch.device("meta"):
        ours = GPT(config).state_dict()
    origin = "the tensor shapes"
    table_rows = [take_tensor(source, "tok_embeddings.weight", (config.codebook_size, config.n_embd), path, origin),
                  take_tensor(source, "cls_embedding.embedding_table.weight", (config.n_classes + 1, config.n_embd), path,
                        origin)]
    state = {"token_embedding.weight": torch.cat(table_rows)}   # codes, classes, the null class = our start token
    used = {"tok_embeddings.weight", "cls_embedding.embedding_table.weight"}
    for key, theirs in llamagen_plan(config).items():
        state[key] = take_tensor(source, theirs, tuple(ours[key].shape), path, origin)
        used.add(theirs)
    GPT(config).load_state_dict(state)   # strict: every key, every shape
    caches = {key for key in source if ".kv_cache." in key}   # buffers of a model saved after setup_caches()
    ignored = unused_keys(source, used | caches, path, LLAMAGEN_IGNORED, model_prefixes=("",))
    ignored.update({key: "sampling KV cache" for key in sorted(caches)})
    ignored.update({f"[{key}]": "training bookkeeping" for key in checkpoint if container and key != container})

    manifest = {}
    if vqgan is not None:
        grid = list(vqgan.model.latent_grid)
        if vqgan.config.codebook_size != config.codebook_size or math.prod(grid) != config.tokens_per_image:
            raise ConfigError(f"--vqgan {vqgan.path}: {vqgan.config.codebook_size} codes on a {grid[0]}x{grid[1]} grid, "
                              f"but the GPT predicts {config.codebook_size} codes on "
                              f"{math.isqrt(config.tokens_per_image)}x{math.isqrt(config.tokens_per_image)}")
        manifest = {"kind": "tokens", "codebook_size": config.codebook_size, "latent_grid": grid,
                    "image_size": vqgan.config.image_size, "classes": [str(c) for c in range(config.n_classes)],
                    "vqgan_checkpoint": str(Path(vqgan.path).resolve()), "vqgan_sha256": vqgan.sha256,
                    "vqgan_weights": vqgan.weights}   # an EMA's when the checkpoint holds one: decoded with those
    return ImportedGPT(config, state, manifest, ignored,
                       {"format": "llamagen-gpt", "checkpoint": str(path.resolve()), "weights": container or "top level",
                        "sha256": sha256_file(path)})


def write_imported_gpt(imported: ImportedGPT, out: str | Path) -> Path:
    """A GPT run folder every tool takes: step_00000000.pt, latest, config.json."""
    return write_imported_folder(out, "gpt", config_to_dict(imported.config), {"gpt": imported.gpt}, imported.source,
                                 imported.ignored, recorded={"token_manifest": imported.token_manifest})
