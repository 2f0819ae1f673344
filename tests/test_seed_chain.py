"""The flagship chain at full size: shardify -> VQGAN seed -> quantizer -> GPT seed -> sample.py, one step each."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_image_folder
from tests.helpers import load, run_script


@pytest.mark.slow
def test_seed_presets_chain_end_to_end_at_256px(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=("cats", "dogs"), per_class=3, size=(300, 280))
    shards, tokens = tmp_path / "shards", tmp_path / "tokens"
    vqgan_run, gpt_run, samples = tmp_path / "vqgan", tmp_path / "gpt", tmp_path / "samples"
    run_script("shardify.py", str(images), str(shards), "--size", "256", "--val-count", "2", "--workers", "1")
    # only the budget (steps, batch) and the offline LPIPS backbone are given: no architecture flag to guess
    run_script("train_resnet_vqgan.py", "--preset=seed", f"--data={shards}", f"--out={vqgan_run}", "--max-steps=1",
               "--batch-size=1", "--eval-batch-size=2", "--lpips-random-backbone", timeout=900)
    run_script("image_quantizer.py", f"--vqgan={vqgan_run}", f"--data={shards}", f"--out={tokens}",
               "--batch-size=2", timeout=900)
    manifest = json.loads((tokens / "manifest.json").read_text())
    assert manifest["codebook_size"] == 8192 and manifest["latent_grid"] == [16, 16]
    assert manifest["vqgan_weights"] == "ema"   # the preset keeps a weight EMA, and the tokens come from it
    run_script("train_gpt.py", "--preset=seed", f"--tokens={tokens}", f"--out={gpt_run}", "--max-steps=1",
               "--batch-size=1", "--sample-count=0", timeout=900)
    state = load(gpt_run / (gpt_run / "latest").read_text().strip())
    assert state["config"]["codebook_size"] == 8192 and state["config"]["tokens_per_image"] == 256
    assert state["config"]["n_classes"] == 2
    assert state["config"]["weight_ema_decay"] == 0.9999 and "gpt_ema" in state
    run_script("sample.py", f"--gpt={gpt_run}", "--n=1", "--class=1", f"--out={samples}", timeout=900)
    sample = np.asarray(Image.open(samples / "sample_000.png"))
    assert sample.shape == (256, 256, 3)
