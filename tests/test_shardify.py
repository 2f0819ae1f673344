"""shardify: decoding, bad input, determinism, overwrite refusal, interrupted runs."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import gradient_image, make_image_folder
from tests.helpers import run_shardify
from vqgpt import dataprep
from vqgpt.dataprep import DataPrepError, scan_folder, write_shards
from vqgpt.shards import ShardError, ShardSplit, ShardWriter


def shard_once(src: Path, dest: Path, size: int = 16, **kwargs) -> dict:
    kwargs.setdefault("val_count", 2)
    return write_shards(scan_folder(src), dest, size=size, shard_size=3, workers=1, progress=False, **kwargs)


def all_items(dest: Path, split: str):
    data = ShardSplit(dest, split, verify_hashes=True)
    return data.read(np.arange(len(data)))


def folder_digest(dest: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(dest.iterdir())}


def test_round_trip_png_and_jpeg_with_labels(tmp_path):
    src = make_image_folder(tmp_path / "src", per_class=5, size=(16, 16))
    manifest = shard_once(src, tmp_path / "out", size=16)
    assert manifest["classes"] == ["cats", "dogs"]
    assert manifest["splits"]["train"]["count"] == 8 and manifest["splits"]["val"]["count"] == 2
    assert manifest["skipped"] == []
    train_items, train_labels = all_items(tmp_path / "out", "train")
    val_items, val_labels = all_items(tmp_path / "out", "val")
    assert train_items.dtype == np.uint8 and train_items.shape == (8, 16, 16, 3)
    # every source image appears once, PNGs bit-exact (already at the target size), with its class
    items = np.concatenate([train_items, val_items])
    labels = np.concatenate([train_labels, val_labels])
    for c in range(2):
        for i in range(0, 5, 2):
            expected = gradient_image(16, 16, seed=100 * c + i)
            matches = [k for k in range(len(items)) if np.array_equal(items[k], expected)]
            assert len(matches) == 1 and labels[matches[0]] == c
    assert np.bincount(labels, minlength=2).tolist() == [5, 5]


def test_resize_short_side_then_centre_crop(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :10] = 255   # white left quarter is cropped away
    array[:, 10:30] = (0, 200, 0)
    Image.fromarray(array).save(src / "wide.png")
    Image.fromarray(array).save(src / "wide2.png")
    write_shards(scan_folder(src), tmp_path / "out", size=10, val_count=0, workers=1, progress=False)
    items, labels = all_items(tmp_path / "out", "train")
    assert labels is None and items.shape == (2, 10, 10, 3)
    assert np.abs(items[0, :, 1:-1].astype(int) - (0, 200, 0)).max() <= 5  # Lanczos ringing


def test_every_bad_input_is_skipped_and_reported(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(gradient_image(16, 16, 1)).save(src / "good.png")
    (src / "empty.jpg").write_bytes(b"")
    (src / "notes.png").write_text("this is text, not a picture")
    full = src / "full.jpg"
    Image.fromarray(gradient_image(64, 64, 2)).save(full, quality=90)
    (src / "truncated.jpg").write_bytes(full.read_bytes()[: len(full.read_bytes()) // 3])
    full.unlink()
    Image.fromarray(np.zeros((120, 120, 3), np.uint8)).save(src / "bomb.png")
    Image.fromarray(gradient_image(16, 16, 3)).save(src / "locked.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # 120x120 > 2x the limit: a bomb
    real_open = Image.open

    def open_or_deny(path, *args, **kwargs):
        if str(path).endswith("locked.png"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", open_or_deny)
    manifest = shard_once(src, tmp_path / "out", val_count=0)
    reasons = {s["file"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"empty.jpg", "notes.png", "truncated.jpg", "bomb.png", "locked.png"}
    assert reasons["empty.jpg"] == "empty file"
    assert "not a recognised image" in reasons["notes.png"]
    assert "truncated" in reasons["truncated.jpg"]
    assert "bomb" in reasons["bomb.png"]
    assert "Permission denied" in reasons["locked.png"]
    items, _ = all_items(tmp_path / "out", "train")
    assert len(items) == 1 and np.array_equal(items[0], gradient_image(16, 16, 1))


def test_modes_rgba_cmyk_16bit_palette(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 128    # half-transparent red over white -> (255, 127, 127)
    Image.fromarray(rgba, "RGBA").save(src / "a_rgba.png")
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(src / "b_cmyk.jpg", quality=100)   # pure red
    gray16 = np.full((8, 8), 65535 // 2, np.uint16)
    Image.fromarray(gray16).save(src / "c_gray16.png")
    palette = Image.new("P", (8, 8))
    palette.putpalette([0, 0, 255] + [0] * 765)
    palette.save(src / "d_palette.png")
    manifest = write_shards(scan_folder(src), tmp_path / "out", size=8, val_count=0, workers=1,
                            progress=False, seed=0)
    assert manifest["skipped"] == []
    items, _ = all_items(tmp_path / "out", "train")
    colours = sorted(tuple(int(v) for v in item[4, 4]) for item in items)
    expected = sorted([(255, 127, 127), (254, 0, 0), (128, 128, 128), (0, 0, 255)])
    for got, want in zip(colours, expected):
        assert max(abs(g - w) for g, w in zip(got, want)) <= 3, (colours, expected)


def test_exif_orientation_is_applied(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    array = np.zeros((8, 16, 3), np.uint8)   # wide: left half red, right half blue
    array[:, :8] = (255, 0, 0)
    array[:, 8:] = (0, 0, 255)
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6    # "rotate 90 CW to display": red ends up on top
    image.save(src / "rotated.jpg", exif=exif, quality=100)
    image.save(src / "rotated2.jpg", exif=exif, quality=100)
    write_shards(scan_folder(src), tmp_path / "out", size=8, val_count=0, workers=1, progress=False)
    items, _ = all_items(tmp_path / "out", "train")
    top, bottom = items[0, 1, 4].astype(int), items[0, 6, 4].astype(int)
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_same_input_gives_byte_identical_output(tmp_path):
    src = make_image_folder(tmp_path / "src", per_class=6)
    shard_once(src, tmp_path / "one")
    write_shards(scan_folder(src), tmp_path / "two", size=16, shard_size=3, val_count=2, workers=2, progress=False)
    assert folder_digest(tmp_path / "one") == folder_digest(tmp_path / "two")
    shard_once(src, tmp_path / "three", seed=1)
    assert folder_digest(tmp_path / "one") != folder_digest(tmp_path / "three")


def test_refuses_to_overwrite_without_flag(tmp_path, capsys):
    src = make_image_folder(tmp_path / "src")
    dest = tmp_path / "out"
    assert run_shardify([str(src), str(dest), "--size", "16", "--workers", "1", "--progress=false"]) == 0
    before = folder_digest(dest)
    assert run_shardify([str(src), str(dest), "--size", "16", "--workers", "1", "--progress=false"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert folder_digest(dest) == before
    assert run_shardify([str(src), str(dest), "--size", "16", "--workers", "1", "--progress=false", "--overwrite", "--seed", "3"]) == 0


def test_empty_or_all_skipped_source_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run_shardify([str(tmp_path / "empty"), str(tmp_path / "out"), "--progress=false"]) == 2
    assert "no image files" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_text("nope")
    (bad / "b.jpg").write_bytes(b"")
    assert run_shardify([str(bad), str(tmp_path / "out2"), "--progress=false", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "every one of 2 files was skipped" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out2" / "manifest.json").exists()


def test_interrupted_run_leaves_nothing_then_rerun_completes(tmp_path, monkeypatch):
    src = make_image_folder(tmp_path / "src", per_class=6)
    dest = tmp_path / "out"
    real_write = ShardWriter.write_shard
    calls = {"n": 0}

    def crash_after_first_shard(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash between shards")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(ShardWriter, "write_shard", staticmethod(crash_after_first_shard))
    with pytest.raises(KeyboardInterrupt):
        shard_once(src, dest)
    assert not any(dest.iterdir())   # the partial set lived in the staging folder, now gone
    with pytest.raises(ShardError, match="manifest.json"):
        ShardSplit(dest, "train")
    monkeypatch.setattr(ShardWriter, "write_shard", staticmethod(real_write))
    shard_once(src, dest)   # no --overwrite needed: there was no finished manifest
    shard_once(src, tmp_path / "clean")
    assert folder_digest(dest) == folder_digest(tmp_path / "clean")


def test_builtin_cli_and_help(tmp_path, capsys):
    dest = tmp_path / "shapes"
    assert run_shardify(["--builtin", "shapes", str(dest), "--builtin-count", "60", "--val-count", "10",
                          "--workers", "1", "--progress=false"]) == 0
    out = capsys.readouterr().out
    assert "train      50" in out and "classes (6)" in out
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["image_size"] == 32 and manifest["source_root"] == "builtin:shapes"
    items, labels = all_items(dest, "train")
    assert items.shape == (50, 32, 32, 3) and labels.max() < 6
    assert items.std() > 20   # real structure, not a flat colour
    with pytest.raises(SystemExit) as exit_info:
        run_shardify(["--help"])
    assert exit_info.value.code == 0
    assert "--val-fraction" in capsys.readouterr().out


def test_labels_none_and_flat_folders(tmp_path):
    src = make_image_folder(tmp_path / "src")
    source = scan_folder(src, labels="none")
    assert source.labels is None and source.classes == []
    assert dataprep.resolve_val_count(100, 0.01, None) == 1
    with pytest.raises(DataPrepError):
        dataprep.resolve_val_count(3, 0.5, 3)


def test_stored_size_keeps_a_margin_that_readers_crop(tmp_path, capsys):
    src = make_image_folder(tmp_path / "src", per_class=3, size=(40, 30))
    common = [str(src), "--size", "16", "--workers", "1", "--progress=false", "--val-count", "2"]
    assert run_shardify([*common[:1], str(tmp_path / "larger"), *common[1:], "--stored-size", "20"]) == 0
    assert "stored at 20x20" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "larger" / "manifest.json").read_text())
    assert manifest["item_shape"] == [20, 20, 3] and (manifest["image_size"], manifest["stored_size"]) == (16, 20)
    stored = np.load(tmp_path / "larger" / "train_00000.npy")
    items, _ = all_items(tmp_path / "larger", "train")
    assert stored.shape[1:] == (20, 20, 3) and np.array_equal(items[:len(stored)], stored[:, 2:18, 2:18])

    for name, extra in (("plain", []), ("same", ["--stored-size", "16"])):   # stored at --size: as before
        assert run_shardify([*common[:1], str(tmp_path / name), *common[1:], *extra]) == 0
    assert {k: v for k, v in folder_digest(tmp_path / "plain").items() if k.endswith(".npy")} == \
        {k: v for k, v in folder_digest(tmp_path / "same").items() if k.endswith(".npy")}
    assert ShardSplit(tmp_path / "same", "train").crop_room == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:   # when parsed
        run_shardify([*common[:1], str(tmp_path / "small"), *common[1:], "--stored-size", "12"])
    assert refused.value.code == 2 and "--stored-size 12 is below the image size 16" in capsys.readouterr().err


def test_a_vqgan_trains_on_random_crops_of_images_stored_larger(tmp_path):
    from tests.helpers import run_script, train_records, vqgan_args
    from vqgpt.dataprep import builtin_source

    write_shards(builtin_source("shapes", 60), tmp_path / "shapes", size=32, stored_size=36, shard_size=30,
                 val_count=10, workers=1, progress=False)
    run_script("train_resnet_vqgan.py", *vqgan_args(tmp_path / "shapes", tmp_path / "run", 2))   # eval at the end
    records = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert len(train_records(tmp_path / "run")) == 2 and records["kind"] == "eval" and records["val_images"] == 10
