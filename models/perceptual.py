"""LPIPS (VGG) perceptual loss that never downloads and never loads weights silently.

The `lpips` package would fetch torchvision's VGG16 from the internet and load its own linear
heads with strict=False, so a key mismatch leaves random heads and a loss that measures
nothing. Here the backbone comes from the torch hub cache or a given path, and every tensor of
both files is loaded strictly.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn

VGG16_WEIGHTS_FILE = "vgg16-397923af.pth"


class LPIPSWeightsMissing(OSError):
    """The VGG16 backbone weights are not where we look, or are not VGG16's; the message says what to do."""


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_weights_file(user_path: str | None, file_name: str) -> Path | None:
    """The user's file (None if it does not exist), else the torch hub cache's `file_name`, else None."""
    path = Path(user_path).expanduser() if user_path else hub_checkpoint_dir() / file_name
    return path if path.is_file() else None


def find_vgg_weights(user_path: str | None) -> Path | None:
    """The user's file (which must exist), else the torch hub cache's copy, else None."""
    path = find_weights_file(user_path, VGG16_WEIGHTS_FILE)
    if user_path and path is None:
        raise LPIPSWeightsMissing(f"--lpips-weights {user_path}: no such file")
    return path


def missing_weights_message() -> str:
    return (f"LPIPS needs torchvision's VGG16 ImageNet weights {VGG16_WEIGHTS_FILE}, not found in "
            f"{hub_checkpoint_dir()}/. Copy the file there (it is what torchvision.models.vgg16(weights='IMAGENET1K_V1') "
            f"downloads), or pass --lpips-weights PATH; for an offline smoke run only, "
            f"--lpips-random-backbone true; or --perceptual-weight 0 to train without LPIPS")


def _load_strict(module: nn.Module, state: dict, source: str) -> None:
    try:
        result = module.load_state_dict(state, strict=False)   # strict=False only to report both key lists
    except RuntimeError as err:   # shape mismatches
        raise LPIPSWeightsMissing(f"{source}: weights do not fit LPIPS VGG16: {str(err).splitlines()[-1].strip()}") from None
    if result.missing_keys or result.unexpected_keys:
        raise LPIPSWeightsMissing(f"{source}: weights do not match LPIPS (missing {result.missing_keys}, "
                                  f"unexpected {result.unexpected_keys})")


class LPIPS(nn.Module):
    """Per-sample LPIPS distance between images in [-1, 1]: (B, 3, H, W) x 2 -> (B,)."""

    def __init__(self, network: nn.Module, backbone: str):
        super().__init__()
        self.network = network
        self.backbone = backbone   # "pretrained" or "random", for the run log

    def forward(self, images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        return self.network(images, references).flatten(1).sum(1)


def build_lpips(weights_path: str | None = None, random_backbone: bool = False) -> LPIPS:
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torchvision's deprecation note about `pretrained=`
        network = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
    if random_backbone:
        backbone = "random"
        print("LPIPS: RANDOM VGG backbone (--lpips-random-backbone): real linear heads, untrained features; "
              "not a perceptual loss, smoke runs only", flush=True)
    else:
        path = find_vgg_weights(weights_path)
        if path is None:
            raise LPIPSWeightsMissing(missing_weights_message())
        try:
            vgg_state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:   # not a torch file, truncated, or pickled code weights_only refuses
            raise LPIPSWeightsMissing(f"{path}: cannot be read as torchvision's {VGG16_WEIGHTS_FILE} "
                                      f"({type(err).__name__}); {missing_weights_message()}") from None
        if not isinstance(vgg_state, dict):
            raise LPIPSWeightsMissing(f"{path}: holds no state dict; is it torchvision's {VGG16_WEIGHTS_FILE}?")
        # torchvision names the convs features.N; lpips keeps N inside five slices
        slices = {name: module for name, module in network.net.named_children()}
        mapped = {}
        for slice_name, slice_module in slices.items():
            for index in slice_module._modules:
                for kind in ("weight", "bias"):
                    key = f"features.{index}.{kind}"
                    if isinstance(slice_module._modules[index], nn.Conv2d):
                        if key not in vgg_state:
                            raise LPIPSWeightsMissing(f"{path}: no {key}; is it torchvision's {VGG16_WEIGHTS_FILE}?")
                        mapped[f"{slice_name}.{index}.{kind}"] = vgg_state[key]
        _load_strict(network.net, mapped, str(path))
        backbone = "pretrained"
    heads_path = Path(os.path.dirname(lpips.__file__)) / "weights" / "v0.1" / "vgg.pth"
    heads = torch.load(heads_path, map_location="cpu", weights_only=True)
    _load_strict(network.lins, {k.replace("lin", "", 1): v for k, v in heads.items()}, str(heads_path))
    network.eval().requires_grad_(False)
    return LPIPS(network, backbone).eval()
