"""Published tokenizers in (taming, LlamaGen), fine-tuning from them, and safetensors exports out.

The fixtures in tests/fixtures/ were made with taming's and LlamaGen's own code (see the README
there): the imported runs must give their codes exactly and their reconstructions to 1e-4.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from models.discriminator import NLayerDiscriminator
from models.gpt import GPT, GPTConfig
from models.vqgan import VQGAN
from tests.helpers import load, overridden, run_script
from vqgpt.checkpoint import CheckpointError, latest_checkpoint, save_checkpoint
from vqgpt.config import config_to_dict, parse_config
from vqgpt.settings import ExportConfig, ImportConfig, VQGANTrainConfig
from vqgpt.errors import ConfigError, exit_on_user_error
from vqgpt.export import export_run, from_pretrained
from vqgpt.safe_pickle import load_foreign_checkpoint
from vqgpt.trained_models import load_gpt, load_vqgan

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TAMING_CKPT, TAMING_YAML = FIXTURES / "taming_last.ckpt", FIXTURES / "taming_model.yaml"
LLAMAGEN_CKPT = FIXTURES / "llamagen_vq.pt"
TOLERANCE = 1e-4


def import_main(**settings) -> int:
    import import_vqgan

    return exit_on_user_error(lambda: import_vqgan.main(ImportConfig(**settings)), "import_vqgan")


def import_taming(out: Path, ckpt: Path = TAMING_CKPT, config: Path = TAMING_YAML) -> int:
    return import_main(from_="taming", ckpt=str(ckpt), config=str(config), out=str(out))


def import_llamagen(out: Path, ckpt: Path = LLAMAGEN_CKPT) -> int:
    return import_main(from_="llamagen", ckpt=str(ckpt), out=str(out), image_size=16)


def reproduction(run: Path, reference: str) -> tuple[bool, float, float, float]:
    """(codes equal, max |recon diff|, max |decode_indices diff|, max |disc logits diff|) against the source's."""
    ref = load_file(FIXTURES / f"{reference}_reference.safetensors")
    vqgan = load_vqgan(run)
    state = load(latest_checkpoint(run))
    discriminator = NLayerDiscriminator(3, vqgan.config.disc_ndf, vqgan.config.disc_layers)
    discriminator.load_state_dict(state["discriminator"])
    with torch.no_grad():
        codes = vqgan.model.encode_to_indices(ref["images"])
        recon = vqgan.model(ref["images"])[0]
        from_codes = vqgan.model.decode_indices(ref["codes"])
        logits = discriminator.eval()(ref["images"])
    return (torch.equal(codes, ref["codes"]), (recon - ref["reconstructions"]).abs().max().item(),
            (from_codes - ref["reconstructions"]).abs().max().item(), (logits - ref["disc_logits"]).abs().max().item())


@pytest.fixture(scope="module")
def taming_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "taming"
    assert import_taming(out) == 0
    return out


@pytest.fixture(scope="module")
def shards16(tmp_path_factory) -> Path:
    from vqgpt.dataprep import builtin_source, write_shards

    dest = tmp_path_factory.mktemp("shapes16")
    write_shards(builtin_source("shapes", 48), dest, size=16, shard_size=48, val_count=8, workers=1, progress=False)
    return dest


def test_taming_import_reproduces_codes_and_reconstructions(taming_run, capsys):
    codes_equal, recon, from_codes, logits = reproduction(taming_run, "taming")
    print(f"taming: codes equal {codes_equal}, max abs diff recon {recon:.2e}, decode_indices {from_codes:.2e}, "
          f"discriminator {logits:.2e}")
    assert codes_equal and recon < TOLERANCE and from_codes < TOLERANCE and logits < TOLERANCE
    config = load_vqgan(taming_run).config
    # embed_dim 16 != z_channels 32: taming's quant_conv itself maps onto the codebook; taming's loss form
    assert (config.codebook_dim, config.quant_conv_to_codebook, config.vq_loss) == (16, True, "taming")
    ignored = json.loads((taming_run / "config.json").read_text())["ignored_keys"]
    assert set(ignored) == {f"[{k}]" for k in ("epoch", "global_step", "pytorch-lightning_version", "callbacks",
                                               "optimizer_states", "lr_schedulers", "hparams_name", "hyper_parameters")}


def test_llamagen_import_reproduces_codes_and_reconstructions(tmp_path):
    assert import_llamagen(tmp_path / "run") == 0
    codes_equal, recon, from_codes, logits = reproduction(tmp_path / "run", "llamagen")
    print(f"llamagen: codes equal {codes_equal}, max abs diff recon {recon:.2e}, decode_indices {from_codes:.2e}, "
          f"discriminator {logits:.2e}")
    assert codes_equal and recon < TOLERANCE and from_codes < TOLERANCE and logits < TOLERANCE
    config = load_vqgan(tmp_path / "run").config
    assert (config.quantizer, config.codebook_dim, config.z_channels, config.vq_loss) == ("l2", 8, 32, "vqvae")


def test_llamagen_usage_buffer_is_reported_not_mapped(tmp_path):
    """Published VQ-16 files hold `quantize.codebook_used`; it is listed as ignored, an unknown model key stops."""
    state = load_foreign_checkpoint(LLAMAGEN_CKPT)["model"]
    torch.save({"model": {**state, "quantize.codebook_used": torch.zeros(65536)}}, tmp_path / "usage.pt")
    assert import_llamagen(tmp_path / "run", tmp_path / "usage.pt") == 0
    ignored = json.loads((tmp_path / "run" / "config.json").read_text())["ignored_keys"]
    assert list(ignored) == ["quantize.codebook_used"]
    torch.save({"model": {**state, "encoder.extra.weight": torch.zeros(3)}}, tmp_path / "extra.pt")
    assert import_llamagen(tmp_path / "refused", tmp_path / "extra.pt") == 2
    assert not (tmp_path / "refused").exists()


def test_taming_equal_dims_imports_without_projection(tmp_path):
    """embed_dim == z_channels (every published taming VQGAN): our plain quant_conv. The fixture padded
    with zero channels computes the same distances and images, so the references still hold."""
    state = dict(load_foreign_checkpoint(TAMING_CKPT)["state_dict"])
    pad = 16
    state["quant_conv.weight"] = torch.cat([state["quant_conv.weight"], torch.zeros(pad, 32, 1, 1)])
    state["quant_conv.bias"] = torch.cat([state["quant_conv.bias"], torch.zeros(pad)])
    state["quantize.embedding.weight"] = torch.cat([state["quantize.embedding.weight"], torch.zeros(64, pad)], 1)
    state["post_quant_conv.weight"] = torch.cat([state["post_quant_conv.weight"], torch.randn(32, pad, 1, 1)], 1)
    torch.save({"state_dict": state}, tmp_path / "last.ckpt")
    params = yaml.safe_load(TAMING_YAML.read_text())
    params["model"]["params"]["embed_dim"] = 32
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(params))
    assert import_taming(tmp_path / "run", tmp_path / "last.ckpt", tmp_path / "model.yaml") == 0
    assert not load_vqgan(tmp_path / "run").config.quant_conv_to_codebook
    codes_equal, recon, from_codes, _ = reproduction(tmp_path / "run", "taming")
    assert codes_equal and recon < TOLERANCE and from_codes < TOLERANCE


def test_taming_lpips_becomes_lpips_weights(tmp_path):
    """taming's loss.perceptual_loss.net.sliceK.N.* is written out as torchvision's features.N.*, which
    --lpips-weights loads strictly into LPIPS."""
    import torchvision

    from models.perceptual import build_lpips

    state = dict(load_foreign_checkpoint(TAMING_CKPT)["state_dict"])
    with torch.device("meta"):
        vgg = torchvision.models.vgg16().features
    slices = [range(0, 4), range(4, 9), range(9, 16), range(16, 23), range(23, 30)]
    for number, indices in enumerate(slices, 1):
        for index in indices:
            if isinstance(vgg[index], torch.nn.Conv2d):
                for kind in ("weight", "bias"):
                    shape = getattr(vgg[index], kind).shape
                    state[f"loss.perceptual_loss.net.slice{number}.{index}.{kind}"] = torch.full(shape, index / 100,
                                                                                               dtype=torch.float16)
    for head, channels in enumerate((64, 128, 256, 512, 512)):
        state[f"loss.perceptual_loss.lin{head}.model.1.weight"] = torch.zeros(1, channels, 1, 1)
    state["loss.perceptual_loss.scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)
    torch.save({"state_dict": state}, tmp_path / "last.ckpt")
    assert import_taming(tmp_path / "run", tmp_path / "last.ckpt") == 0
    weights = tmp_path / "run" / "lpips_vgg16.pth"
    lpips = build_lpips(str(weights))
    assert lpips.backbone == "pretrained"
    assert torch.all(lpips.network.net.slice3._modules["14"].weight == torch.tensor(0.14, dtype=torch.float16).float())
    ignored = json.loads((tmp_path / "run" / "config.json").read_text())["ignored_keys"]
    assert len([k for k in ignored if k.startswith("loss.perceptual_loss.")]) == 6


def test_code_running_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "marker"

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    state = load_foreign_checkpoint(TAMING_CKPT)["state_dict"]
    torch.save({"state_dict": state, "callbacks": RunsCode()}, tmp_path / "evil.ckpt")
    torch.load(tmp_path / "evil.ckpt", weights_only=False)   # the control: a plain load runs it
    assert marker.exists()
    marker.unlink()
    result = run_script("import_vqgan.py", "--from=taming", f"--ckpt={tmp_path / 'evil.ckpt'}",
                        f"--config={TAMING_YAML}", f"--out={tmp_path / 'run'}", check=False)
    assert result.returncode == 2
    assert not marker.exists() and not (tmp_path / "run").exists()
    assert len(result.stderr.strip().splitlines()) == 1 and "system" in result.stderr and "refused" in result.stderr


def test_unknown_class_refused(tmp_path, capsys):
    import datetime

    state = load_foreign_checkpoint(LLAMAGEN_CKPT)["model"]
    torch.save({"model": state, "saved_at": datetime.datetime(2024, 1, 1)}, tmp_path / "dated.pt")
    assert import_llamagen(tmp_path / "run", tmp_path / "dated.pt") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "datetime.datetime" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage, message", [
    ("truncated", "not a torch checkpoint"),
    ("missing", "missing key encoder.down.1.attn.0.k.weight"),
    ("shape", "key decoder.conv_out.weight has shape (3, 32, 1, 1)"),
    ("yaml", "embed_dim"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, damage, message):
    ckpt, config = tmp_path / "last.ckpt", TAMING_YAML
    state = dict(load_foreign_checkpoint(TAMING_CKPT)["state_dict"])
    if damage == "truncated":
        ckpt.write_bytes(TAMING_CKPT.read_bytes()[:200_000])
    else:
        if damage == "missing":
            del state["encoder.down.1.attn.0.k.weight"]
        if damage == "shape":
            state["decoder.conv_out.weight"] = torch.zeros(3, 32, 1, 1)
        torch.save({"state_dict": state}, ckpt)
    if damage == "yaml":
        config = tmp_path / "model.yaml"
        config.write_text(TAMING_YAML.read_text().replace("embed_dim: 16", "embed_dm: 16"))
    assert import_taming(tmp_path / "run", ckpt, config) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_a_folder_holding_checkpoints_is_not_overwritten(taming_run, capsys):
    before = {p.name: p.read_bytes() for p in taming_run.iterdir()}
    assert import_llamagen(taming_run) == 2
    assert "not empty" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in taming_run.iterdir()} == before


def vqgan_flags(data: Path, out: Path, *extra: str) -> list[str]:
    return overridden([f"--data={data}", f"--out={out}", "--max-steps=2", "--batch-size=4", "--warmup-steps=0",
                       "--disc-start=0", "--eval-every=0", "--log-every=1", "--perceptual-weight=0", "--lr=1e-4"], extra)


def test_init_from_imported_run_then_two_steps(taming_run, shards16, tmp_path):
    out = tmp_path / "finetune"
    run_script("train_resnet_vqgan.py", *vqgan_flags(shards16, out, f"--init-from={taming_run}"))
    source, tuned = load(latest_checkpoint(taming_run)), load(latest_checkpoint(out))
    assert tuned["step"] == 2
    assert tuned["config"]["ch"] == 32 and tuned["config"]["vq_loss"] == "taming"   # the source's architecture
    for name in ("vqgan", "discriminator"):
        # two Adam steps of lr 1e-4 move each weight by at most ~2e-4: the source's, not a fresh init
        moved = max((tuned[name][k] - v).abs().max().item() for k, v in source[name].items()
                    if v.is_floating_point() and "running_" not in k)
        assert 0 < moved < 1e-3, (name, moved)
    fresh = NLayerDiscriminator(3, 8, 2).state_dict()["main.0.weight"]
    assert (fresh - source["discriminator"]["main.0.weight"]).abs().max() > 1e-2


def test_init_from_refuses_a_conflicting_architecture_flag(taming_run, shards16, tmp_path, capsys):
    import train_resnet_vqgan

    cfg = parse_config(VQGANTrainConfig, {}, vqgan_flags(shards16, tmp_path / "ft", f"--init-from={taming_run}",
                                                         "--ch=64"))
    assert exit_on_user_error(lambda: train_resnet_vqgan.main(cfg), "train_resnet_vqgan") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--ch 64 (the source has 32)" in err
    assert not (tmp_path / "ft").exists()


def test_init_from_keeps_every_setting_given_even_at_its_default(tmp_path):
    import dataclasses

    from models.vqgan import VQGANConfig
    from vqgpt.settings import VQGAN_TRAIN_PRESETS
    from vqgpt.finetune import InitSource, adopt_architecture

    source = InitSource(tmp_path, dataclasses.replace(VQGANConfig(), dead_code_steps=10, beta=0.5, ch=32), {}, None)

    def adopted(*flags: str) -> VQGANTrainConfig:
        return adopt_architecture(parse_config(VQGANTrainConfig, VQGAN_TRAIN_PRESETS, ["--data=d", *flags]), source)

    assert (adopted().dead_code_steps, adopted().beta, adopted().ch) == (10, 0.5, 32)   # not given: the source's
    given = adopted("--dead-code-steps=0", "--beta=0.25")   # both equal the defaults, and were asked for
    assert (given.dead_code_steps, given.beta, given.ch) == (0, 0.25, 32)
    with pytest.raises(ConfigError, match="--ch 64 .the source has 32."):   # an architecture flag at its default
        adopted("--ch=64")


def safetensors_tensor_bytes(path: Path) -> tuple[dict, int]:
    """(header, bytes after it); a safetensors file is an 8-byte length, a JSON header and raw tensor data."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), len(data) - 8 - length


def test_export_vqgan_round_trip_without_pickle(taming_run, shards16, tmp_path):
    out = tmp_path / "export"
    assert exit_on_user_error(lambda: __import__("export").main(ExportConfig(run=str(taming_run), out=str(out))),
                              "export") == 0
    header, payload = safetensors_tensor_bytes(out / "model.safetensors")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    assert payload == max(v["data_offsets"][1] for v in tensors.values())   # nothing but tensors: no pickle
    assert header["__metadata__"]["stage"] == "vqgan"
    images = load_file(FIXTURES / "taming_reference.safetensors")["images"]
    original, exported = load_vqgan(taming_run), from_pretrained(out)
    assert isinstance(exported, VQGAN)
    with torch.no_grad():
        assert torch.equal(original.model(images)[0], exported(images)[0])
        assert torch.equal(original.model.encode_to_indices(images), exported.encode_to_indices(images))
    assert load_vqgan(out).sha256 == original.sha256   # token sets made with either accept both
    info = json.loads((out / "config.json").read_text())
    assert info["imported_from"]["format"] == "taming" and "# vqgpt VQGAN" in (out / "README.md").read_text()
    assert export_run_refused(taming_run, out)
    run_script("image_quantizer.py", f"--vqgan={out}", f"--data={shards16}", f"--out={tmp_path / 'tokens'}",
               "--progress=false")
    manifest = json.loads((tmp_path / "tokens" / "manifest.json").read_text())
    assert manifest["codebook_size"] == 64 and manifest["vqgan_sha256"] == original.sha256


def export_run_refused(run: Path, out: Path) -> bool:
    from vqgpt.errors import RunError

    before = (out / "model.safetensors").read_bytes()
    try:
        export_run(run, out)
    except RunError:
        return (out / "model.safetensors").read_bytes() == before
    return False


def test_export_gpt_round_trip(tmp_path):
    config = GPTConfig(codebook_size=64, n_classes=2, tokens_per_image=16, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    model = GPT(config).eval()
    manifest = {"vqgan_sha256": "ab" * 32, "codebook_size": 64}
    (tmp_path / "gpt").mkdir()
    save_checkpoint(tmp_path / "gpt", 7, {"stage": "gpt", "step": 7, "config": config_to_dict(config),
                                          "gpt": model.state_dict(), "token_manifest": manifest})
    out = tmp_path / "export"
    assert exit_on_user_error(lambda: __import__("export").main(
        parse_config(ExportConfig, {}, ["--run", str(tmp_path / "gpt"), "--out", str(out)])), "export") == 0
    exported = from_pretrained(out)
    assert isinstance(exported, GPT)
    tokens = torch.randint(0, 64, (3, 16))
    with torch.no_grad():
        assert torch.equal(model(tokens)[0], exported(tokens)[0])
    assert exported.head.weight is exported.token_embedding.weight   # tying survives the de-duplicated file
    loaded = load_gpt(out)
    assert loaded.token_manifest == manifest and loaded.step == 7


def test_init_from_an_export_takes_its_weights_and_architecture(taming_run, tmp_path):
    from tests.helpers import assert_state_dicts_equal
    from vqgpt.finetune import adopt_architecture, load_init_source

    export_run(taming_run, tmp_path / "export")
    source = load_init_source(tmp_path / "export")
    assert source.discriminator is None   # weights only: the fine-tune starts a discriminator of its own size
    assert_state_dicts_equal(source.vqgan, load(latest_checkpoint(taming_run))["vqgan"])
    cfg = adopt_architecture(VQGANTrainConfig(disc_ndf=16, beta=0.5), source)
    assert (cfg.ch, cfg.codebook_dim, cfg.vq_loss, cfg.disc_ndf, cfg.beta) == (32, 16, "taming", 16, 0.5)


def test_an_export_with_other_weights_or_a_malformed_source_is_refused(tmp_path):
    from safetensors.torch import load_file as load_tensors, save_file

    config = GPTConfig(codebook_size=16, n_classes=0, tokens_per_image=4, n_layer=1, n_head=1, n_embd=8)
    (tmp_path / "gpt").mkdir()
    save_checkpoint(tmp_path / "gpt", 1, {"stage": "gpt", "step": 1, "config": config_to_dict(config),
                                          "gpt": GPT(config).state_dict(), "token_manifest": {}})
    out = export_run(tmp_path / "gpt", tmp_path / "export")
    assert load_gpt(out).step == 1
    weights = out / "model.safetensors"
    tensors = load_tensors(weights)
    name = next(iter(tensors))
    save_file({**tensors, name: tensors[name] + 1}, weights, metadata={"format": "vqgpt-export-1", "stage": "gpt"})
    with pytest.raises(CheckpointError, match="not the file export.py wrote"):
        load_gpt(out)
    info = json.loads((out / "config.json").read_text())
    del info["weights_sha256"]   # as an older export: no hash to check, the weights load
    for source in ({"sha256": "ab" * 32}, "nonsense"):
        (out / "config.json").write_text(json.dumps({**info, "source": source}))
        with pytest.raises(CheckpointError, match="source"):
            load_gpt(out)


def test_a_patchgan_too_deep_for_the_image_size_is_left_out_and_said():
    from vqgpt.importers import import_llamagen

    imported = import_llamagen(LLAMAGEN_CKPT, image_size=8)   # its 2-layer PatchGAN needs 12 px for one logit
    assert imported.discriminator is None and imported.config.disc_layers <= 1
    assert "no logit at 8 px" in imported.ignored["[discriminator]"]
    assert import_llamagen(LLAMAGEN_CKPT, image_size=16).discriminator is not None
