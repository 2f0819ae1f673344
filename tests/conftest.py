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
