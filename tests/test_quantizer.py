"""image_quantizer.py: exact tokens, DDP equals one process, resume skip, binding to the checkpoint."""
from __future__ import annotations

import json
import shutil

import numpy as np
import torch

from tests.helpers import run_script
from vqgpt.images import to_unit_range
from vqgpt.shards import ShardSplit
from vqgpt.trained_models import load_vqgan


def quantize(vqgan, data, out, *extra, nproc=0, check=True):
    return run_script("image_quantizer.py", f"--vqgan={vqgan}", f"--data={data}", f"--out={out}",
                      "--batch-size=64", "--progress=false", *extra, nproc=nproc, check=check)


def test_token_shards_decode_to_the_vqgans_own_reconstruction(shapes_tokens, shapes_shards, tiny_vqgan_run):
    manifest = json.loads((shapes_tokens / "manifest.json").read_text())
    vqgan = load_vqgan(tiny_vqgan_run)
    assert manifest["vqgan_sha256"] == vqgan.sha256 and manifest["codebook_size"] == 256
    assert manifest["latent_grid"] == [8, 8] and manifest["dtype"] == "uint16"
    assert manifest["classes"] == ShardSplit(shapes_shards, "train").classes
    tokens = ShardSplit(shapes_tokens, "val")
    images = ShardSplit(shapes_shards, "val")
    token_items, token_labels = tokens.read(np.arange(len(tokens)))
    image_items, image_labels = images.read(np.arange(len(images)))
    assert np.array_equal(token_labels, image_labels) and token_items.shape == (100, 64)
    with torch.no_grad():
        pixels = to_unit_range(torch.from_numpy(image_items[:16]))
        own_reconstruction, _, indices, _ = vqgan.model(pixels)
        from_tokens = vqgan.model.decode_indices(torch.from_numpy(token_items[:16].astype(np.int64)))
    assert torch.equal(indices.flatten(1), torch.from_numpy(token_items[:16].astype(np.int64)))
    assert torch.equal(from_tokens, own_reconstruction)
    usage = manifest["usage"]
    histogram = np.load(shapes_tokens / usage["histogram_file"])
    assert histogram.sum() == 800 * 64 and 0 < usage["codebook_usage"] <= 1
    assert (shapes_tokens / usage["plot_file"]).stat().st_size > 1000


def test_two_processes_write_the_same_bytes_as_one(shapes_tokens, shapes_shards, tiny_vqgan_run, tmp_path):
    quantize(tiny_vqgan_run, shapes_shards, tmp_path / "ddp", nproc=2)
    for name in ("train_00000.npy", "train_00001.npy", "train_00002.npy", "val_00000.npy", "val_00000_labels.npy"):
        assert (tmp_path / "ddp" / name).read_bytes() == (shapes_tokens / name).read_bytes(), name
    one = json.loads((shapes_tokens / "manifest.json").read_text())
    two = json.loads((tmp_path / "ddp" / "manifest.json").read_text())
    assert one["splits"] == two["splits"]


def test_rerun_skips_finished_shards_and_flip_adds_a_set(shapes_shards, tiny_vqgan_run, tmp_path):
    out = tmp_path / "tok"
    quantize(tiny_vqgan_run, shapes_shards, out, "--flip=true")
    manifest = json.loads((out / "manifest.json").read_text())
    files = [r["file"] for r in manifest["splits"]["train"]["shards"]]
    assert "train_flip_00000.npy" in files and manifest["splits"]["train"]["count"] == 1400
    flipped = np.load(out / "train_flip_00000.npy")
    plain = np.load(out / "train_00000.npy")
    assert not np.array_equal(flipped, plain)
    (out / "train_00001.npy").unlink()     # an interrupted run: one shard missing
    (out / "manifest.json").unlink()
    good_labels = (out / "train_flip_00000_labels.npy").read_bytes()
    (out / "train_flip_00000_labels.npy").write_bytes(b"damaged")   # a damaged labels file is redone too
    mtime = (out / "train_00000.npy").stat().st_mtime_ns
    result = quantize(tiny_vqgan_run, shapes_shards, out, "--flip=true")
    assert "already matched" in result.stdout
    assert (out / "train_00000.npy").stat().st_mtime_ns == mtime
    assert (out / "train_flip_00000_labels.npy").read_bytes() == good_labels
    assert json.loads((out / "manifest.json").read_text())["splits"] == manifest["splits"]


def test_bad_inputs_exit_2_and_overwrite_nothing(shapes_tokens, shapes_shards, tiny_vqgan_run, tmp_path):
    not_a_vqgan = tmp_path / "notvq.pt"
    torch.save({"stage": "gpt", "config": {}}, not_a_vqgan)
    result = quantize(not_a_vqgan, shapes_shards, tmp_path / "a", check=False)
    assert result.returncode == 2 and "not a VQGAN" in result.stderr

    from vqgpt.dataprep import builtin_source, write_shards
    write_shards(builtin_source("shapes", 20), tmp_path / "big", size=64, val_count=4, workers=1, progress=False)
    result = quantize(tiny_vqgan_run, tmp_path / "big", tmp_path / "b", check=False)
    assert result.returncode == 2 and "images are 64x64" in result.stderr

    other_data = tmp_path / "other"
    write_shards(builtin_source("shapes", 30), other_data, size=32, val_count=5, workers=1, progress=False, seed=9)
    copy = tmp_path / "copy"
    shutil.copytree(shapes_tokens, copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()}
    result = quantize(tiny_vqgan_run, other_data, copy, check=False)
    assert result.returncode == 2 and "another source" in result.stderr
    assert {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()} == before


def test_a_users_files_under_the_names_it_would_write_are_never_overwritten(shapes_shards, tiny_vqgan_run, tmp_path):
    for name in ("train_00000.npy", "codebook_usage.png"):
        out = tmp_path / name
        out.mkdir()
        (out / name).write_bytes(b"mine")
        result = quantize(tiny_vqgan_run, shapes_shards, out, check=False)
        assert result.returncode == 2 and f"holds {name}" in result.stderr and "nothing was changed" in result.stderr
        assert (out / name).read_bytes() == b"mine" and sorted(p.name for p in out.iterdir()) == [name]


def test_crops_writes_k_sets_of_other_crops_and_the_centre_as_the_base(tiny_vqgan_run, shapes_shards, tmp_path):
    from vqgpt.dataprep import builtin_source, write_shards
    from vqgpt.quantize import crop_corners

    data = tmp_path / "stored"
    write_shards(builtin_source("shapes", 70), data, size=32, stored_size=40, shard_size=40, val_count=10, workers=1,
                 progress=False)
    out = tmp_path / "tok"
    quantize(tiny_vqgan_run, data, out, "--crops=2")
    manifest = json.loads((out / "manifest.json").read_text())
    files = [r["file"] for r in manifest["splits"]["train"]["shards"]]
    assert manifest["crops"] == 2 and manifest["splits"]["train"]["count"] == 3 * 60
    assert {"train_crop1_00000.npy", "train_crop2_00001.npy"} <= set(files) and len(files) == 6
    split, vqgan = ShardSplit(data, "train"), load_vqgan(tiny_vqgan_run)
    stored = np.concatenate([split.shard_arrays(i)[0] for i in range(2)])
    tokens = {name: np.concatenate([np.load(out / f"train{name}_0000{i}.npy") for i in range(2)]).astype(np.int64)
              for name in ("", "_crop1", "_crop2")}
    with torch.no_grad():
        decoded = {name: vqgan.model.decode_indices(torch.from_numpy(t)) for name, t in tokens.items()}
        for crop, name in enumerate(tokens):   # each set: the encoder's codes of its crops (the centre first)
            corners = np.concatenate([crop_corners(split, i, crop) for i in range(2)])
            crops = np.stack([image[t:t + 32, l:l + 32] for image, (t, l) in zip(stored, corners)])
            codes = vqgan.model(to_unit_range(torch.from_numpy(crops)))[2].flatten(1)
            assert torch.equal(codes, torch.from_numpy(tokens[name])), name
    assert np.array_equal(crop_corners(split, 0, 0), np.full((40, 2), 4))
    for a, b in (("", "_crop1"), ("", "_crop2"), ("_crop1", "_crop2")):   # the sets decode to other images
        differ = (decoded[a] - decoded[b]).flatten(1).abs().amax(1) > 0
        assert differ.float().mean() > 0.8, (a, b)
    histogram = np.load(out / manifest["usage"]["histogram_file"])
    assert histogram.sum() == 70 * 64   # the dataset's usage counts each image once

    other = quantize(tiny_vqgan_run, data, out, "--crops=1", check=False)
    assert other.returncode == 2 and "was made with --crops 2" in other.stderr
    plain = quantize(tiny_vqgan_run, shapes_shards, tmp_path / "plain", "--crops=2", check=False)
    assert plain.returncode == 2 and "--stored-size" in plain.stderr and not (tmp_path / "plain").exists()
