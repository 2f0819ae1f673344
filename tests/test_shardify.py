"""shardify: decoding, bad input, determinism, overwrite refusal, interrupted runs."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import gradient_image, make_image_folder
from tests.helpers import ROOT, run_shardify, script_env
from vqgpt import dataprep
from vqgpt.dataprep import DataPrepError, scan_folder, write_shards
from vqgpt.images import SkipImage, load_square_image
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


def interrupt_after_shards(monkeypatch, finished: int) -> None:
    """The next shardify run stops (as by Ctrl-C) when it starts writing shard number `finished` + 1."""
    real_write = ShardWriter.write_shard
    calls = {"n": 0}

    def write_or_stop(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > finished:
            monkeypatch.setattr(ShardWriter, "write_shard", staticmethod(real_write))
            raise KeyboardInterrupt("simulated interruption between shards")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(ShardWriter, "write_shard", staticmethod(write_or_stop))


def count_decodes(monkeypatch) -> dict:
    real_load, calls = dataprep.load_square_image, {"n": 0}

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real_load(*args, **kwargs)

    monkeypatch.setattr(dataprep, "load_square_image", counted)
    return calls


def test_interrupted_run_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    src = make_image_folder(tmp_path / "src", per_class=6)   # 12 images: train 10 in shards of 3, val 2
    (src / "cats" / "broken.png").write_text("not a picture")   # a skip before the interruption is kept too
    shard_once(src, tmp_path / "clean")
    dest = tmp_path / "out"
    interrupt_after_shards(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        shard_once(src, dest)
    assert visible(dest) == []   # the partial set lives in the staging folder
    with pytest.raises(ShardError, match="manifest.json"):
        ShardSplit(dest, "train")
    decodes = count_decodes(monkeypatch)
    shard_once(src, dest)   # no --overwrite needed: there was no finished manifest
    assert folder_digest(dest) == folder_digest(tmp_path / "clean")
    assert decodes["n"] <= 13 - 6   # the 6 images of the 2 kept shards were not decoded again
    assert not (dest / dataprep.STAGING_NAME).exists()

    # a kept shard whose bytes changed is written again, with all after it
    interrupt_after_shards(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        shard_once(src, tmp_path / "again")
    staged = tmp_path / "again" / dataprep.STAGING_NAME / "train_00001.npy"
    staged.write_bytes(staged.read_bytes()[:-1] + b"\x00")
    decodes["n"] = 0
    shard_once(src, tmp_path / "again")
    assert folder_digest(tmp_path / "again") == folder_digest(tmp_path / "clean")
    assert 13 - 3 - 1 <= decodes["n"] <= 13 - 3   # only the first shard was kept

    # another seed is another set: the staged shards are dropped, not mixed in
    interrupt_after_shards(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        shard_once(src, tmp_path / "other")
    decodes["n"] = 0
    shard_once(src, tmp_path / "other", seed=1)
    shard_once(src, tmp_path / "clean1", seed=1)
    assert folder_digest(tmp_path / "other") == folder_digest(tmp_path / "clean1")
    assert decodes["n"] == 26   # both seed-1 runs decoded everything


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


# shardify.py with decoding hooked, in a subprocess of its own: a worker that dies or a SIGTERM must not hang pytest
HOOKED_SHARDIFY = """
import os, signal, sys, time
import shardify
from vqgpt import dataprep
from vqgpt.config import parse_config
from vqgpt.errors import exit_on_user_error
from vqgpt.settings import SHARDIFY_PRESETS, ShardifyConfig

action, target, marks = sys.argv[1:4]
real_load = dataprep.load_square_image

def hooked(path, *args, **kwargs):
    open(os.path.join(marks, str(os.getpid())), "w").close()   # who decoded: the workers' pids
    if action == "kill" and str(path).endswith(target):
        os.kill(os.getpid(), signal.SIGKILL)   # what the OOM killer does
    if action == "slow":
        time.sleep(0.2)
    return real_load(path, *args, **kwargs)

dataprep.load_square_image = hooked
sys.exit(exit_on_user_error(lambda: shardify.main(parse_config(ShardifyConfig, SHARDIFY_PRESETS, sys.argv[4:])),
                            "shardify"))
"""


def start_hooked(action: str, target: str, marks: Path, argv: list[str]) -> subprocess.Popen:
    marks.mkdir()
    return subprocess.Popen([sys.executable, "-c", HOOKED_SHARDIFY, action, target, str(marks), *argv], cwd=ROOT,
                            env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(process: subprocess.Popen, bound: float = 60) -> str:
    """stderr of a process that must end by itself; a hang is killed (with its workers) and fails the test."""
    try:
        return process.communicate(timeout=bound)[1]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"shardify still running after {bound} s")


def visible(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir() if p.name != dataprep.STAGING_NAME) if dest.exists() else []


def cli_args(src: Path, dest: Path, *extra: str) -> list[str]:
    return [str(src), str(dest), "--size=16", "--shard-size=3", "--val-count=2", "--progress=false", *extra]


def test_killed_worker_fails_with_one_line_and_the_rerun_finishes(tmp_path):
    src = make_image_folder(tmp_path / "src", per_class=6)
    dest = tmp_path / "out"
    process = start_hooked("kill", "dogs/img_3.jpg", tmp_path / "marks", cli_args(src, dest, "--workers=2"))
    err = finish(process)
    assert process.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "decoding process" in lines[0] and "Traceback" not in err, err
    assert visible(dest) == []   # DEST as it was: empty
    assert run_shardify(cli_args(src, dest, "--workers=1")) == 0   # the same command, fewer workers
    shard_once(src, tmp_path / "clean")
    assert folder_digest(dest) == folder_digest(tmp_path / "clean")


def test_sigterm_stops_workers_and_leaves_dest_as_it_was(tmp_path):
    src = make_image_folder(tmp_path / "src", per_class=6)
    dest, marks = tmp_path / "out", tmp_path / "marks"
    process = start_hooked("slow", "", marks, cli_args(src, dest, "--workers=2"))
    while not any(marks.iterdir()) and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)   # to shardify alone, as `kill PID` or a job scheduler does
    err = finish(process)
    assert process.returncode == 128 + signal.SIGTERM, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "SIGTERM" in lines[0] and "Error" not in err, err
    workers = [int(p.name) for p in marks.iterdir()]
    assert workers and process.pid not in workers
    for pid in workers:   # terminated and reaped, not orphans still decoding into a closed pipe
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert visible(dest) == []
    assert run_shardify(cli_args(src, dest, "--workers=2")) == 0   # the same command goes on
    shard_once(src, tmp_path / "clean")
    assert folder_digest(dest) == folder_digest(tmp_path / "clean")


def test_workers_do_not_outlive_a_killed_shardify(tmp_path):
    src = make_image_folder(tmp_path / "src", per_class=6)
    marks = tmp_path / "marks"
    process = start_hooked("slow", "", marks, cli_args(src, tmp_path / "out", "--workers=2"))
    while not any(marks.iterdir()) and process.poll() is None:
        time.sleep(0.05)
    process.kill()   # kill -9: no handler runs in shardify itself
    finish(process)
    workers = [int(p.name) for p in marks.iterdir()]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(alive(pid) for pid in workers):
        time.sleep(0.1)
    assert workers and not any(alive(pid) for pid in workers)


def alive(pid: int) -> bool:
    """Running, and not a zombie waiting for a reaper that this container may not have."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def center_crop_arr(pil_image, image_size):
    """guided-diffusion's image_datasets.center_crop_arr, as published (the reference --resize adm must match)."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def test_resize_adm_matches_center_crop_arr_pixel_for_pixel(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    # (width, height): a typical photo, odd sides, exactly 2x, just under 2x, large (several halvings), upscaled
    for width, height in ((400, 350), (257, 129), (64, 128), (127, 300), (1031, 777), (20, 45), (33, 32)):
        smooth = gradient_image(width, height, seed=width)
        noisy = np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(src / f"{width}x{height}.png")
    Image.fromarray(gradient_image(500, 375, seed=1)).save(src / "photo.jpg", quality=90)
    for path in sorted(src.iterdir()):
        with Image.open(path) as image:
            image.load()
            expected = center_crop_arr(image.convert("RGB"), 32)
        assert np.array_equal(load_square_image(path, 32, resize="adm"), expected), path.name
    manifest = write_shards(scan_folder(src), tmp_path / "out", size=32, resize="adm", val_count=0, workers=1,
                            progress=False)
    assert manifest["resize"] == "adm" and manifest["skipped"] == []
    assert shard_once(src, tmp_path / "default", size=32)["resize"] == "lanczos"
    Image.fromarray(gradient_image(2, 400, seed=3)).save(tmp_path / "strip.png")   # 32 x 6400 once scaled up
    with pytest.raises(SkipImage, match="elongated"):
        load_square_image(tmp_path / "strip.png", 32, resize="adm")
    with pytest.raises(SystemExit):   # built-in images are drawn at the size: nothing to resize
        run_shardify(["--builtin", "shapes", str(tmp_path / "shapes"), "--resize", "adm"])


def test_file_links_are_followed_folder_links_are_not(tmp_path):
    """A symlink farm of image files is a legitimate SRC (README); a linked folder is not descended (no loops)."""
    elsewhere, src = tmp_path / "elsewhere", tmp_path / "src"
    (elsewhere / "more").mkdir(parents=True)
    src.mkdir()
    for k, path in enumerate((src / "a.png", elsewhere / "b.png", elsewhere / "more" / "c.png")):
        Image.fromarray(gradient_image(16, 16, seed=k)).save(path)
    (src / "b.png").symlink_to(elsewhere / "b.png")
    (src / "more").symlink_to(elsewhere / "more")
    (src / "loop").symlink_to(src)
    assert scan_folder(src).files == ["a.png", "b.png"]
    shard_once(src, tmp_path / "out", val_count=0)
    items, _ = all_items(tmp_path / "out", "train")
    assert sum(np.array_equal(item, gradient_image(16, 16, seed=1)) for item in items) == 1   # the linked file


def test_a_stop_during_the_swap_lets_it_finish(tmp_path, monkeypatch):
    """Ctrl-C between two renames of the swap-in would leave DEST with neither set's manifest."""
    src, dest = make_image_folder(tmp_path / "src"), tmp_path / "out"
    assert run_shardify(cli_args(src, dest, "--workers=1")) == 0
    real_replace = os.replace

    def replace_then_interrupt(source, target):
        real_replace(source, target)
        if Path(target).parent.name == dataprep.PREVIOUS_NAME:   # the old set's manifest just moved aside
            monkeypatch.setattr(dataprep.os, "replace", real_replace)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(dataprep.os, "replace", replace_then_interrupt)
    assert run_shardify(cli_args(src, dest, "--workers=1", "--overwrite", "--seed=5")) == 0
    shard_once(src, tmp_path / "clean", seed=5)
    assert folder_digest(dest) == folder_digest(tmp_path / "clean")


def test_resize_adm_with_a_stored_margin_is_refused(capsys):
    """A --size crop of an ADM crop made at the stored size is a zoom: not the ADM crop the manifest would claim."""
    from vqgpt.config import parse_config
    from vqgpt.settings import ShardifyConfig

    with pytest.raises(SystemExit):
        parse_config(ShardifyConfig, {}, ["s", "d", "--size=16", "--stored-size=20", "--resize=adm"])
    assert "does not combine with --stored-size" in capsys.readouterr().err
    assert parse_config(ShardifyConfig, {}, ["s", "d", "--size=16", "--stored-size=16", "--resize=adm"]).resize == "adm"


def test_a_failed_run_removes_the_dest_it_made_and_nothing_else(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "broken.png").write_bytes(b"not an image")
    assert run_shardify([str(src), str(tmp_path / "new"), "--size", "16"]) == 2   # every file skipped: a verdict
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    assert run_shardify([str(src), str(tmp_path / "mine"), "--size", "16"]) == 2
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
