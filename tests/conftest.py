"""Shared fixtures: small real image folders and built-in shard sets made once per session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from vqgpt.dataprep import builtin_source, write_shards  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than about 20 s on 2 CPU cores (deselect with -m 'not slow')")


def gradient_image(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = rng.integers(0, 255, 3)
    image = (base + x[..., None] * 2 + y[..., None] * 3 * rng.integers(1, 3)) % 256
    return image.astype(np.uint8)


def make_image_folder(root: Path, classes=("cats", "dogs"), per_class: int = 5, size=(40, 30)) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            array = gradient_image(*size, seed=100 * c + i)
            suffix = ".png" if i % 2 == 0 else ".jpg"
            Image.fromarray(array).save(root / name / f"img_{i}{suffix}", quality=95)
    return root


@pytest.fixture(scope="session")
def shapes_shards(tmp_path_factory) -> Path:
    """800 built-in 32 px images: 700 train, 100 val, 6 classes."""
    dest = tmp_path_factory.mktemp("shapes")
    write_shards(builtin_source("shapes", 800), dest, size=32, shard_size=300, val_count=100,
                 workers=1, progress=False)
    return dest


@pytest.fixture(scope="session")
def tiny_vqgan_run(shapes_shards, tmp_path_factory) -> Path:
    """A VQGAN trained for a few steps on the shapes shards (real checkpoint, random LPIPS backbone)."""
    from tests.helpers import VQGAN_TEST_FLAGS, run_script

    out = tmp_path_factory.mktemp("vqgan_run")
    run_script("train_resnet_vqgan.py", f"--data={shapes_shards}", f"--out={out}", "--max-steps=3", *VQGAN_TEST_FLAGS)
    return out


@pytest.fixture(scope="session")
def shapes_tokens(tiny_vqgan_run, shapes_shards, tmp_path_factory) -> Path:
    from tests.helpers import run_script

    out = tmp_path_factory.mktemp("tokens") / "tokens"
    run_script("image_quantizer.py", f"--vqgan={tiny_vqgan_run}", f"--data={shapes_shards}", f"--out={out}",
               "--batch-size=128", "--progress=false")
    return out
