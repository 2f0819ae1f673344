"""import_gpt.py against LlamaGen's own code (tests/fixtures/llamagen/), then sample.py, train_gpt.py --init-from
and export.py on the imported run."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import import_gpt
from tests.helpers import load, run_script
from vqgpt.checkpoint import latest_checkpoint
from vqgpt.config import parse_config
from vqgpt.errors import exit_on_user_error
from vqgpt.export import export_run, from_pretrained
from vqgpt.safe_pickle import load_foreign_checkpoint
from vqgpt.sampling import sample_tokens
from vqgpt.settings import IMPORT_GPT_PRESETS, ImportGPTConfig
from vqgpt.trained_models import load_gpt

FIXTURES = Path(__file__).resolve().parent / "fixtures"
GPT_CKPT = FIXTURES / "llamagen" / "gpt_c2i.pt"
REFERENCE = FIXTURES / "llamagen" / "gpt_reference.safetensors"
CODES, GRID, CLASSES = 64, 4, 10


def import_gpt_main(*argv: str) -> int:
    return exit_on_user_error(lambda: import_gpt.main(parse_config(ImportGPTConfig, IMPORT_GPT_PRESETS, list(argv))),
                              "import_gpt")


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory) -> Path:
    """LlamaGen's tiny VQ fixture at 8 px: 64 codes on a 4 x 4 grid, the GPT fixture's vocabulary."""
    out = tmp_path_factory.mktemp("vq") / "run"
    run_script("import_vqgan.py", "--from=llamagen", f"--ckpt={FIXTURES / 'llamagen_vq.pt'}", f"--out={out}",
               "--image-size=8")
    return out


@pytest.fixture(scope="module")
def gpt_run(vq_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpt") / "run"
    assert import_gpt_main("--from=llamagen", f"--ckpt={GPT_CKPT}", f"--out={out}", f"--vqgan={vq_run}",
                           "--n-head=4") == 0
    return out


def test_imported_gpt_gives_llamagens_logits_and_greedy_grids(gpt_run):
    gpt = load_gpt(gpt_run)
    ref = load_file(REFERENCE)
    config = gpt.config
    assert (config.arch, config.codebook_size, config.n_classes, config.tokens_per_image) == ("llama", CODES, CLASSES, 16)
    inputs = torch.cat([(ref["labels"] + CODES)[:, None], ref["tokens"][:, :-1]], dim=1)   # class token, 15 codes
    with torch.no_grad():
        logits, _ = gpt.model(inputs)
    torch.testing.assert_close(logits, ref["logits"], rtol=0, atol=1e-4)
    for name, scale in (("greedy_cfg1", 1.0), ("greedy_cfg4", 4.0)):
        for use_kv_cache in (True, False):
            tokens = sample_tokens(gpt.model, 4, labels=ref["labels"], cfg_scale=scale, temperature=0,
                                   use_kv_cache=use_kv_cache)
            assert torch.equal(tokens, ref[name]), (name, use_kv_cache)
    assert not torch.equal(ref["greedy_cfg1"], ref["greedy_cfg4"])   # guidance changes the grids: the test can fail
    info = json.loads((gpt_run / "config.json").read_text())
    assert set(info["ignored_keys"]) == {"[steps]", "[args]"}   # every tensor mapped


def test_imported_gpt_samples_with_sample_py_and_exports(gpt_run, tmp_path):
    run_script("sample.py", f"--gpt={gpt_run}", "--n=2", "--class=3", "--cfg=4", f"--out={tmp_path / 'samples'}")
    assert Image.open(tmp_path / "samples" / "sample_000.png").size == (8, 8)
    exported = export_run(gpt_run, tmp_path / "export")
    model = from_pretrained(exported)
    ref = load_file(REFERENCE)
    inputs = torch.cat([(ref["labels"] + CODES)[:, None], ref["tokens"][:, :-1]], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs)[0], ref["logits"], rtol=0, atol=1e-4)


def test_init_from_the_imported_gpt_fine_tunes_on_tokens_of_its_vqgan(vq_run, gpt_run, tmp_path):
    # the fixture's GPT cut to the 6 classes of the built-in shapes (their rows and the null row), no args
    source = load_foreign_checkpoint(GPT_CKPT)["model"]
    table = source["cls_embedding.embedding_table.weight"]
    source["cls_embedding.embedding_table.weight"] = torch.cat([table[:6], table[-1:]])
    torch.save(source, tmp_path / "bare.pt")
    refused = import_gpt_main("--from=llamagen", f"--ckpt={tmp_path / 'bare.pt'}", f"--out={tmp_path / 'x'}",
                              "--n-head=4")
    assert refused == 2 and not (tmp_path / "x").exists()   # no args, no --vqgan: the grid is unknown
    assert import_gpt_main("--from=llamagen", f"--ckpt={tmp_path / 'bare.pt'}", f"--out={tmp_path / 'gpt'}",
                           "--n-head=4", "--grid-size=4") == 0

    shards, tokens = tmp_path / "shards", tmp_path / "tokens"
    run_script("shardify.py", "--builtin=shapes", str(shards), "--builtin-count=60", "--size=8", "--val-count=10",
               "--workers=1")
    run_script("image_quantizer.py", f"--vqgan={vq_run}", f"--data={shards}", f"--out={tokens}", "--progress=false")
    # a learning rate too small to move a weight: after two steps the run still holds the imported weights
    run_script("train_gpt.py", f"--tokens={tokens}", f"--out={tmp_path / 'ft'}", f"--init-from={tmp_path / 'gpt'}",
               "--max-steps=2", "--batch-size=4", "--lr=1e-12", "--warmup-steps=0", "--eval-every=0",
               "--sample-count=2", "--eval-batch-size=10", "--log-every=1")
    tuned, imported = load(latest_checkpoint(tmp_path / "ft")), load(latest_checkpoint(tmp_path / "gpt"))
    assert tuned["step"] == 2 and tuned["config"]["arch"] == "llama" and tuned["config"]["n_layer"] == 2
    for key, value in imported["gpt"].items():
        torch.testing.assert_close(tuned["gpt"][key], value, rtol=0, atol=1e-6)
    conflicting = run_script("train_gpt.py", f"--tokens={tokens}", f"--out={tmp_path / 'ft2'}",
                             f"--init-from={tmp_path / 'gpt'}", "--max-steps=1", "--n-layer=3", check=False)
    assert conflicting.returncode == 2 and "--n-layer 3 (the source has 2)" in conflicting.stderr
    other_classes = run_script("train_gpt.py", f"--tokens={tokens}", f"--out={tmp_path / 'ft3'}",
                               f"--init-from={gpt_run}", "--max-steps=1", check=False)
    assert other_classes.returncode == 2 and "n_classes 6 (the source has 10)" in other_classes.stderr


def test_code_running_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "marker"

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    state = load_foreign_checkpoint(GPT_CKPT)["model"]
    torch.save({"model": state, "args": RunsCode()}, tmp_path / "evil.pt")
    result = run_script("import_gpt.py", "--from=llamagen", f"--ckpt={tmp_path / 'evil.pt'}",
                        f"--out={tmp_path / 'run'}", "--n-head=4", "--grid-size=4", check=False)
    assert result.returncode == 2 and not marker.exists() and not (tmp_path / "run").exists()
    assert len(result.stderr.strip().splitlines()) == 1 and "system" in result.stderr and "refused" in result.stderr


def test_ema_weights_are_preferred_and_leftovers_accounted_for(tmp_path, capsys):
    checkpoint = load_foreign_checkpoint(GPT_CKPT)
    checkpoint["args"] = argparse.Namespace(**checkpoint["args"].state)   # the stand-in back as what it was
    ema = {k: v + 0.5 if k == "norm.weight" else v for k, v in checkpoint["model"].items()}
    ema["layers.0.attention.kv_cache.k_cache"] = torch.zeros(2, 4, 24, 12)   # saved after setup_caches()
    ema["freqs_cis"] = torch.zeros(17, 6, 2)
    torch.save({**checkpoint, "ema": ema}, tmp_path / "ema.pt")
    assert import_gpt_main("--from=llamagen", f"--ckpt={tmp_path / 'ema.pt'}", f"--out={tmp_path / 'run'}",
                           "--n-head=4") == 0
    state = load(latest_checkpoint(tmp_path / "run"))
    torch.testing.assert_close(state["gpt"]["ln_f.weight"], ema["norm.weight"].float())
    ignored = json.loads((tmp_path / "run" / "config.json").read_text())["ignored_keys"]
    assert ignored["[model]"] == "training bookkeeping" and "freqs_cis" in ignored
    assert ignored["layers.0.attention.kv_cache.k_cache"] == "sampling KV cache"

    unknown = {**checkpoint["model"], "layers.0.attention.q_norm.weight": torch.ones(12), "extra.bias": torch.ones(3)}
    torch.save({"model": unknown, "args": checkpoint["args"]}, tmp_path / "unknown.pt")
    assert import_gpt_main("--from=llamagen", f"--ckpt={tmp_path / 'unknown.pt'}", f"--out={tmp_path / 'u'}",
                           "--n-head=4") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "extra.bias, layers.0.attention.q_norm.weight" in err
    assert import_gpt_main("--from=llamagen", f"--ckpt={GPT_CKPT}", f"--out={tmp_path / 'h'}", "--n-head=5") == 2
    assert import_gpt_main("--from=llamagen", f"--ckpt={GPT_CKPT}", f"--out={tmp_path / 'h'}") == 2   # no --n-head
    assert "give --n-head" in capsys.readouterr().err


def test_a_vqgan_with_an_ema_is_bound_with_the_weights_it_decodes_with(vq_run, tmp_path):
    """load_vqgan takes a checkpoint's EMA by default: the binding must say so, or every decode is refused."""
    from vqgpt.trained_models import load_bound_vqgan

    ema_run = tmp_path / "vq-ema"
    ema_run.mkdir()
    state = load(latest_checkpoint(vq_run))
    state["vqgan_ema"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["vqgan"].items()}
    torch.save(state, ema_run / "step_00000000.pt")
    (ema_run / "latest").write_text("step_00000000.pt")
    out = tmp_path / "gpt"
    assert import_gpt_main("--from=llamagen", f"--ckpt={GPT_CKPT}", f"--out={out}", f"--vqgan={ema_run}",
                           "--n-head=4") == 0
    manifest = load(latest_checkpoint(out))["token_manifest"]
    assert manifest["vqgan_weights"] == "ema"
    assert load_bound_vqgan(manifest).weights == "ema"   # the raw weights before the binding said which


def test_sample_py_save_tokens_reproduces_llamagens_greedy_grids(gpt_run, tmp_path):
    """The whole path a user takes: the imported run, sample.py greedy with --save-tokens, LlamaGen's grids."""
    import numpy as np

    ref = load_file(REFERENCE)
    for name, scale in (("greedy_cfg1", 1), ("greedy_cfg4", 4)):
        for row, label in enumerate(ref["labels"].tolist()):
            out = tmp_path / f"{name}-{label}"
            run_script("sample.py", f"--gpt={gpt_run}", "--n=1", f"--class={label}", f"--cfg={scale}",
                       "--temperature=0", "--save-tokens", f"--out={out}")
            assert np.load(out / "tokens.npy").tolist() == [ref[name][row].tolist()], (name, label)
