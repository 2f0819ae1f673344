"""The inference notebooks run end to end; the plots command draws real figures from a run."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from PIL import Image

from tests.helpers import ROOT, run_script


def execute(name: str, first_cell: str, tmp_path: Path) -> nbformat.NotebookNode:
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "commit without outputs"
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    code_cells[0].source = first_cell
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    nbformat.write(notebook, tmp_path / name)
    return notebook


def outputs_text(notebook) -> str:
    return "\n".join(out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", []))


@pytest.fixture(scope="module")
def gpt_for_notebook(shapes_tokens, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt_nb")
    run_script("train_gpt.py", f"--tokens={shapes_tokens}", f"--out={out}", "--preset=tiny", "--max-steps=2",
               "--batch-size=8", "--sample-count=0", "--eval-every=0")
    return out


@pytest.mark.slow
def test_vqgan_notebook_runs(tiny_vqgan_run, shapes_shards, tmp_path):
    notebook = execute("vqgan_inference.ipynb", f'VQGAN_RUN = "{tiny_vqgan_run}"\nSHARDS = "{shapes_shards}"\n'
                       f'IMAGE_FILE = "{shapes_shards.parent}"\nDEVICE = "cpu"', tmp_path)
    text = outputs_text(notebook)
    assert "codes used" in text and "codebook 256" in text
    images = [out for cell in notebook.cells for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]
    assert len(images) >= 3


@pytest.mark.slow
def test_gpt_notebook_runs(gpt_for_notebook, shapes_shards, tmp_path):
    notebook = execute("gpt_inference.ipynb", f'GPT_RUN = "{gpt_for_notebook}"\nSHARDS = "{shapes_shards}"\n'
                       'DEVICE = "cpu"\nSEED = 0', tmp_path)
    assert "classes: ['circle'" in outputs_text(notebook)
    images = [out for cell in notebook.cells for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]
    assert len(images) >= 4


def test_plots_command_draws_valid_pngs(tiny_vqgan_run, gpt_for_notebook, tmp_path):
    result = run_script("-m", "plots", str(tiny_vqgan_run), str(gpt_for_notebook), "--out", str(tmp_path / "figs"))
    assert "L1 (train)" in result.stdout and "train loss" in result.stdout
    pngs = sorted((tmp_path / "figs").glob("*.png"))
    assert len(pngs) >= 2
    for png in pngs:
        with Image.open(png) as image:
            image.verify()
    config = json.loads((tiny_vqgan_run / "config.json").read_text())
    assert config["stage"] == "vqgan"
    bad = run_script("-m", "plots", str(tmp_path), "--out", str(tmp_path / "x"), check=False)
    assert bad.returncode == 2
