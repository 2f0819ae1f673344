"""evaluate.py and vqgpt/fid.py: FID equals torch-fidelity's, bad weights refused, balanced classes, ranks, cache.

The real Inception weights cannot be downloaded here, so a random InceptionV3 in torch-fidelity's
layout stands in, its BatchNorm statistics calibrated so that its features do not collapse.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from tests.conftest import gradient_image
from tests.helpers import (GPT_TEST_FLAGS, VQGAN_TEST_FLAGS, gpt_args, run_script, spy_vqgan_memory_format,
                           vqgan_args)
from vqgpt import fid
from vqgpt.config import parse_config
from vqgpt.settings import EVALUATE_PRESETS, EvaluateConfig
from vqgpt.dataprep import builtin_source, scan_folder, write_shards
from vqgpt.errors import exit_on_user_error
from vqgpt.files import sha256_file
from vqgpt.images import to_uint8, to_unit_range
from vqgpt.runlog import read_metrics
from vqgpt.shards import ShardSplit
from vqgpt.trained_models import load_vqgan

SET_SIZE = 12


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return fid.save_random_inception(tmp_path_factory.mktemp("inception") / fid.INCEPTION_WEIGHTS_FILE, seed=0)


def save_pngs(folder: Path, images) -> Path:
    folder.mkdir(parents=True)
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"img_{index:03d}.png")
    return folder


def shardify(folder: Path, dest: Path) -> Path:
    write_shards(scan_folder(folder, labels="none"), dest, size=32, val_count=0, workers=1, progress=False)
    return dest


@pytest.fixture(scope="module")
def image_sets(shapes_shards, tmp_path_factory) -> dict[str, Path]:
    """Two different 32 px PNG folders (shapes, gradients), the shard folders made from them, and 4-image sets."""
    root = tmp_path_factory.mktemp("image_sets")
    shapes = ShardSplit(shapes_shards, "val").read(np.arange(SET_SIZE))[0]
    gradients = [gradient_image(32, 32, seed) for seed in range(SET_SIZE)]
    sets = {"a_png": save_pngs(root / "a_png", shapes), "b_png": save_pngs(root / "b_png", gradients),
            "few_png": save_pngs(root / "few_png", [gradient_image(32, 32, seed) for seed in range(100, 104)])}
    sets["a_shards"] = shardify(sets["a_png"], root / "a_shards")
    sets["b_shards"] = shardify(sets["b_png"], root / "b_shards")
    sets["few_shards"] = shardify(save_pngs(root / "few_shapes_png", shapes[:4]), root / "few_shards")
    return sets


def score(tmp_path: Path, *flags: str) -> dict:
    """evaluate.py in this process; its JSON result."""
    out = tmp_path / f"result_{len(list(tmp_path.glob('result_*')))}.json"
    cfg = parse_config(EvaluateConfig, EVALUATE_PRESETS, [*flags, f"--out={out}", "--device=cpu", "--progress=false",
                                                          "--batch-size=5"])
    assert evaluate.main(cfg) == 0
    return json.loads(out.read_text())


def refused(capsys, *flags: str) -> str:
    """Run evaluate.py as its __main__ would; it must exit 2 with one line on stderr, which is returned."""
    cfg = parse_config(EvaluateConfig, EVALUATE_PRESETS, [*flags, "--device=cpu", "--progress=false"])
    assert exit_on_user_error(lambda: evaluate.main(cfg), "evaluate") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluate: error: "), lines
    return lines[0]


def test_inception_runs_in_strict_fp32_whatever_the_trainer_switched_on():
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    seen = []

    class Network(torch.nn.Module):   # the layer sFID reads, and the two outputs
        def __init__(self):
            super().__init__()
            self.Mixed_6d = torch.nn.Module()
            self.Mixed_6d.branch1x1 = torch.nn.Identity()

        def forward(self, batch):
            seen.append((cudnn.allow_tf32, cudnn.benchmark, cudnn.deterministic, matmul.allow_tf32,
                         torch.is_autocast_enabled("cpu")))
            self.Mixed_6d.branch1x1(torch.zeros(len(batch), 192, 17, 17))
            return torch.zeros(len(batch), 2048), torch.zeros(len(batch), 1008)

    network = Network()

    saved = cudnn.allow_tf32, cudnn.benchmark, cudnn.deterministic, matmul.allow_tf32
    try:   # what configure_backends sets for training on CUDA (settable on any build)
        cudnn.allow_tf32, cudnn.benchmark, cudnn.deterministic, matmul.allow_tf32 = True, True, False, True
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fid.Inception(network, Path("w"), "0", torch.device("cpu")).features([np.zeros((8, 8, 3), np.uint8)])
        assert seen == [(False, False, True, False, False)]
        assert (cudnn.allow_tf32, cudnn.benchmark, cudnn.deterministic, matmul.allow_tf32) == (True, True, False, True)
    finally:
        cudnn.allow_tf32, cudnn.benchmark, cudnn.deterministic, matmul.allow_tf32 = saved


def test_fid_equals_torch_fidelity_and_separates_different_images(image_sets, weights, tmp_path):
    from torch_fidelity import calculate_metrics

    pngs = np.stack([np.asarray(Image.open(p)) for p in sorted(image_sets["b_png"].glob("*.png"))])
    shards = ShardSplit(image_sets["b_shards"], "train")
    assert sorted(map(bytes, pngs)) == sorted(map(bytes, shards.read(np.arange(len(shards)))[0]))   # same pixels

    ours = score(tmp_path, f"--images={image_sets['a_png']}", f"--ref={image_sets['b_shards']}",
                 f"--inception-weights={weights}", "--cache=false")
    theirs = calculate_metrics(input1=str(image_sets["a_png"]), input2=str(image_sets["b_png"]), fid=True, isc=True,
                               cuda=False, cache=False, verbose=False, save_cpu_ram=True,
                               feature_extractor_weights_path=str(weights))
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-5)
    assert ours["isc_mean"] == pytest.approx(theirs["inception_score_mean"], rel=1e-6)
    assert ours["isc_std"] == pytest.approx(theirs["inception_score_std"], rel=1e-4, abs=1e-9)
    assert ours["images"] == ours["ref_images"] == SET_SIZE and ours["ref_split"] == "train"

    same = score(tmp_path, f"--images={image_sets['a_png']}", f"--ref={image_sets['a_shards']}",
                 f"--inception-weights={weights}", "--cache=false")
    assert ours["fid"] > 1.0 and abs(same["fid"]) < 1e-3 * ours["fid"]
    assert ours["sfid"] > 1.0 and abs(same["sfid"]) < 1e-3 * ours["sfid"]   # mixed_6/conv's 2023 features
    assert same["precision"] == same["recall"] == 1.0 and ours["precision"] < 1.0
    assert ours["inception_weights_sha256"] == same["inception_weights_sha256"] == sha256_file(weights)


def test_npz_references_arr0_and_statistics(image_sets, weights, tmp_path, capsys):
    images = ShardSplit(image_sets["b_shards"], "train").read(np.arange(4))[0]
    np.savez(tmp_path / "batch.npz", arr_0=images)
    from_images = score(tmp_path, f"--images={image_sets['few_png']}",
                        f"--ref={tmp_path / 'batch.npz'}", f"--inception-weights={weights}")
    inception = fid.load_inception(str(weights))
    stats = fid.fid_statistics(inception.features(images).pool)
    np.savez(tmp_path / "stats.npz", mu=stats["mu"], sigma=stats["sigma"])
    from_stats = score(tmp_path, f"--images={image_sets['few_png']}",
                       f"--ref={tmp_path / 'stats.npz'}", f"--inception-weights={weights}")
    assert from_stats["fid"] == pytest.approx(from_images["fid"], rel=1e-9)
    assert from_stats["ref_statistics"] == "npz mu/sigma" and from_images["ref_images"] == 4
    np.savez(tmp_path / "nan.npz", mu=np.full_like(stats["mu"], np.nan), sigma=stats["sigma"])
    assert "hold NaN or infinite values" in refused(capsys, f"--images={image_sets['few_png']}",
                                                    f"--ref={tmp_path / 'nan.npz'}", f"--inception-weights={weights}")


def numpy_precision_recall(samples: np.ndarray, reference: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Kynkaanniemi et al.: a point is covered by a set if it lies within some member's distance to its k-th neighbour."""
    def distances(a, b):
        return np.sqrt(((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1))

    def covered(points, members):
        radii = np.sort(distances(members, members), axis=1)[:, k]   # column 0 is the member itself
        return (distances(points, members) <= radii[None, :]).any(axis=1).mean()

    return covered(samples, reference), covered(reference, samples)


def test_precision_and_recall_equal_a_numpy_reference():
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((120, 16)).astype(np.float32)
    samples = (rng.standard_normal((90, 16)) * 0.7 + 0.3).astype(np.float32)
    assert fid.precision_recall(reference, reference) == {"precision": 1.0, "recall": 1.0,
                                                          "prc_reference_images": len(reference)}
    ours = fid.precision_recall(samples, reference)
    precision, recall = numpy_precision_recall(samples, reference)
    assert 0 < recall < precision < 1   # narrower samples: mostly inside the reference, covering less of it
    assert ours["precision"] == pytest.approx(precision, abs=1e-6) and ours["recall"] == pytest.approx(recall, abs=1e-6)
    shifted = fid.precision_recall(reference + 3.0, reference)
    assert shifted["precision"] < 0.5 and shifted["recall"] < 0.5


def test_a_large_reference_is_subsampled_for_precision_and_recall(monkeypatch):
    """The k-NN radii cost N_ref^2: a reference above the cap is scored on a seeded subsample of cap images."""
    monkeypatch.setattr(fid, "PRC_MAX_REFERENCE", 50)
    rng = np.random.default_rng(1)
    reference = rng.standard_normal((200, 8)).astype(np.float32)
    samples = rng.standard_normal((60, 8)).astype(np.float32)
    ours = fid.precision_recall(samples, reference)
    keep = np.sort(np.random.default_rng(0).choice(200, 50, replace=False))
    precision, recall = numpy_precision_recall(samples, reference[keep])
    assert ours["prc_reference_images"] == 50 and ours == fid.precision_recall(samples, reference)
    assert ours["precision"] == pytest.approx(precision, abs=1e-6) and ours["recall"] == pytest.approx(recall, abs=1e-6)


def test_malformed_npz_references_are_refused_in_one_line(image_sets, weights, tmp_path, capsys):
    mu, sigma = np.zeros(2048), np.eye(2048)
    buffer = tmp_path / "good.npz"
    np.savez(buffer, mu=mu, sigma=sigma)
    good = buffer.read_bytes()
    cases = {"only_mu": dict(mu=mu), "unknown_keys": dict(other=np.zeros(3)),
             "object_arr0": dict(arr_0=np.array([np.zeros(3), "x"], dtype=object)),
             "object_mu": dict(mu=np.array([1, "a"], dtype=object), sigma=sigma),
             "text_mu": dict(mu=np.array(["a"] * 2048), sigma=sigma),
             "half_spatial": dict(mu=mu, sigma=sigma, mu_s=np.zeros(2023))}
    for name, arrays in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
    np.save(tmp_path / "plain.npy", np.zeros(3))
    shutil.copy(tmp_path / "plain.npy", tmp_path / "npy_renamed.npz")
    (tmp_path / "truncated.npz").write_bytes(good[:len(good) // 2])
    (tmp_path / "bad_crc.npz").write_bytes(good[:200] + b"x" * 60 + good[260:])
    images = f"--images={image_sets['few_png']}"
    for name in [*cases, "npy_renamed", "truncated", "bad_crc"]:
        line = refused(capsys, images, f"--ref={tmp_path / name}.npz", f"--inception-weights={weights}")
        assert f"{name}.npz" in line, line
    for name in ("object_arr0", "npy_renamed", "truncated"):   # the same files given as the images to score
        line = refused(capsys, f"--images={tmp_path / name}.npz", f"--ref={image_sets['a_shards']}",
                       f"--inception-weights={weights}")
        assert f"{name}.npz" in line, line


@pytest.mark.parametrize("side", [50, 70])   # over Pillow's limit (a warning), over twice the limit (an error)
def test_decompression_bombs_in_images_are_refused_in_one_line(side, image_sets, weights, tmp_path, capsys,
                                                                 monkeypatch):
    folder = shutil.copytree(image_sets["few_png"], tmp_path / "images")
    Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(folder / "zz_bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)   # the 32 px images stay under it
    line = refused(capsys, f"--images={folder}", f"--ref={image_sets['a_shards']}", f"--inception-weights={weights}",
                   "--cache=false")   # the shared reference stays without a cache for the tests that copy it
    assert "zz_bomb.png" in line and "decompression bomb" in line


def test_cached_statistics_are_reused_and_recomputed_for_other_weights(image_sets, weights, tmp_path, monkeypatch):
    reference = shutil.copytree(image_sets["few_shards"], tmp_path / "ref")
    my_weights = shutil.copy(weights, tmp_path / "inception.pth")
    extractions = []
    real_extract = fid.extract_features
    monkeypatch.setattr(fid, "extract_features", lambda *a, **k: extractions.append(a[0]) or real_extract(*a, **k))
    # the spy sees the reference's extraction only (evaluate.py holds its own name for --images'), and --images
    # has more images than the reference's 4, so the counts below can only be the reference's
    flags = (f"--images={image_sets['a_png']}", f"--ref={reference}", f"--inception-weights={my_weights}")

    first = score(tmp_path, *flags)
    assert extractions == [4] and first["ref_statistics"].startswith("extracted, cached")
    assert [p.name for p in reference.glob("fid_stats_*")] == [f"fid_stats_train_{first['inception_weights_sha256'][:16]}.npz"]
    second = score(tmp_path, *flags)
    assert extractions == [4] and second["ref_statistics"].startswith("cached")
    assert second["fid"] == first["fid"]

    fid.save_random_inception(my_weights, seed=1, calibration_batches=1)   # same path, other weights: another sha256
    third = score(tmp_path, *flags)
    assert extractions == [4, 4] and third["ref_statistics"].startswith("extracted")
    assert third["inception_weights_sha256"] != first["inception_weights_sha256"] and third["fid"] != first["fid"]
    assert len(list(reference.glob("fid_stats_*"))) == 2


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_bad_weights_are_refused_in_one_line_before_any_work(image_sets, tmp_path, capsys, monkeypatch):
    reference = shutil.copytree(image_sets["a_shards"], tmp_path / "ref")
    out = tmp_path / "result.json"
    flags = (f"--images={image_sets['few_png']}", f"--ref={reference}", f"--out={out}")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    line = refused(capsys, *flags)
    assert fid.INCEPTION_WEIGHTS_FILE in line and str(tmp_path / "torch_home" / "hub" / "checkpoints") in line
    assert "--inception-weights" in refused(capsys, *flags, f"--inception-weights={tmp_path / 'nowhere.pth'}")

    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    assert "is not torch-fidelity's InceptionV3 state dict" in refused(
        capsys, *flags, f"--inception-weights={tmp_path / 'other.pth'}")
    (tmp_path / "garbage.pth").write_bytes(b"not a torch file")
    assert "weights_only=True" in refused(capsys, *flags, f"--inception-weights={tmp_path / 'garbage.pth'}")
    marker = tmp_path / "code_ran"
    torch.save(RunsCode(marker), tmp_path / "evil.pth")
    assert "weights_only=True" in refused(capsys, *flags, f"--inception-weights={tmp_path / 'evil.pth'}")
    assert not marker.exists()

    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    shutil.copy(tmp_path / "evil.pth", hub / fid.INCEPTION_WEIGHTS_FILE)
    assert "weights_only=True" in refused(capsys, *flags)
    assert not marker.exists() and not out.exists() and not list(reference.glob("fid_stats_*"))


def test_bad_flags_are_refused(image_sets, weights, capsys):
    assert "--ref" in refused(capsys, f"--images={image_sets['a_png']}", f"--inception-weights={weights}")
    assert "one of" in refused(capsys, f"--inception-weights={weights}")
    assert "--data" in refused(capsys, "--vqgan=runs/x", f"--inception-weights={weights}")
    # a setting the chosen evaluation would ignore is refused, not silently dropped
    images = (f"--images={image_sets['a_png']}", f"--ref={image_sets['a_shards']}", f"--inception-weights={weights}")
    assert "--temperature applies to --gpt only" in refused(capsys, *images, "--temperature=0.5")
    assert "--save-samples applies to --gpt only" in refused(capsys, *images, "--save-samples=out")
    assert "--compile applies to --gpt and --vqgan only" in refused(capsys, *images, "--compile")
    assert "--lpips-weights applies to --vqgan only" in refused(capsys, *images, "--lpips-weights=vgg.pth")


def test_vqgan_mode_rfid_is_the_fid_of_the_reconstructions(tiny_vqgan_run, image_sets, weights, tmp_path):
    result = score(tmp_path, f"--vqgan={tiny_vqgan_run}", f"--data={image_sets['a_shards']}", "--split=train",
                   f"--inception-weights={weights}")
    assert result["mode"] == "vqgan" and result["images"] == SET_SIZE and result["split"] == "train"
    assert {"psnr", "ssim", "l1", "codebook_usage", "perplexity"} <= result.keys() and result["fid"] > 0
    originals = ShardSplit(image_sets["a_shards"], "train").read(np.arange(SET_SIZE))[0]
    vqgan = load_vqgan(tiny_vqgan_run)
    with torch.no_grad():
        reconstructions = to_uint8(vqgan.model(to_unit_range(torch.from_numpy(originals)))[0])
    recon_folder = save_pngs(tmp_path / "recon", reconstructions)
    direct = score(tmp_path, f"--images={recon_folder}", f"--ref={image_sets['a_shards']}",
                   f"--inception-weights={weights}")
    assert result["fid"] == pytest.approx(direct["fid"], rel=1e-4)
    assert direct["ref_statistics"].startswith("cached")   # the --vqgan run cached the originals' statistics


@pytest.mark.parametrize("flags", [("--channels-last=true",),
                                   pytest.param(("--compile=true", "--channels-last=true"), marks=pytest.mark.slow)])
def test_vqgan_mode_channels_last_and_compiled_score_as_eager(flags, tiny_vqgan_run, image_sets, weights, tmp_path,
                                                             monkeypatch):
    common = (f"--vqgan={tiny_vqgan_run}", f"--data={image_sets['a_shards']}", "--split=train",
              f"--inception-weights={weights}")
    eager = score(tmp_path, *common)
    formats = spy_vqgan_memory_format(monkeypatch, evaluate)
    other = score(tmp_path, *common, *flags)
    assert formats == ["channels_last"]   # the flag reached the model that was scored
    for metric in ("psnr", "ssim", "l1", "fid"):
        assert other[metric] == pytest.approx(eager[metric], rel=1e-3, abs=1e-4), metric
    assert other["codebook_usage"] == eager["codebook_usage"]


@pytest.fixture(scope="module")
def gpt_run(shapes_tokens, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpt_eval")
    run_script("train_gpt.py", f"--tokens={shapes_tokens}", f"--out={out}", "--max-steps=2", *GPT_TEST_FLAGS)
    return out


def test_gpt_mode_generates_balanced_classes(gpt_run, image_sets, weights, tmp_path, monkeypatch, capsys):
    drawn, schedules = [], set()
    real_sample = fid.sample_tokens
    monkeypatch.setattr(fid, "sample_tokens", lambda model, n, labels=None, **k: drawn.append(labels.tolist()) or
                        schedules.add((k["cfg_schedule"], k["cfg_interval"])) or real_sample(model, n, labels=labels, **k))
    result = score(tmp_path, f"--gpt={gpt_run}", f"--ref={image_sets['a_shards']}", "--n=18", "--cfg=2",
                   "--cfg-schedule=linear", "--cfg-interval=40", "--top-k=50", f"--inception-weights={weights}",
                   f"--save-samples={tmp_path / 'samples'}", f"--save-npz={tmp_path / 'samples.npz'}")
    assert schedules == {("linear", 40)} and result["sampling"]["cfg_schedule"] == "linear"
    labels = [label for batch in drawn for label in batch]
    assert np.bincount(labels).tolist() == [3] * 6 and result["images_per_class"] == [3] * 6
    assert result["images"] == 18 and result["fid"] > 0
    assert len(list((tmp_path / "samples").glob("*_class5.png"))) == 3
    with np.load(tmp_path / "samples.npz", allow_pickle=False) as saved:   # ADM's evaluator's format
        assert saved["arr_0"].dtype == np.uint8 and saved["arr_0"].shape == (18, 32, 32, 3)
        assert saved["arr_1"].tolist() == [i % 6 for i in range(18)]
    from_npz = score(tmp_path, f"--images={tmp_path / 'samples.npz'}", f"--ref={image_sets['a_shards']}",
                     f"--inception-weights={weights}")
    for key in ("fid", "sfid", "precision", "recall", "isc_mean"):
        assert from_npz[key] == pytest.approx(result[key], rel=1e-6, abs=1e-9), key
    assert "multiple of the model's 6 classes" in refused(capsys, f"--gpt={gpt_run}", f"--ref={image_sets['a_shards']}",
                                                          "--n=10", f"--inception-weights={weights}")


def test_gpt_eval_fid_reads_only_the_image_shards_quantize_wrote_or_fid_ref(shapes_tokens, image_sets, weights,
                                                                            tmp_path, capsys):
    import train_gpt
    from tests.test_hardening import gpt_cfg, token_set

    shards = image_sets["a_shards"].resolve()
    (tmp_path / "link").symlink_to(shards)
    named = {"relative": os.path.relpath(shards), "dotdot": str(shards / ".." / shards.name),
             "link": str(tmp_path / "link"), "image_folder": str(image_sets["a_png"].resolve()),
             "moved": str(tmp_path / "moved"), "token_shards": str(tmp_path / "tokens_relative")}
    for name, path in named.items():   # a token manifest is untrusted: none of these is read
        cfg = gpt_cfg(token_set(tmp_path / f"tokens_{name}", source_shards=path), tmp_path / f"run_{name}", "--eval-fid",
                      f"--inception-weights={weights}")
        assert exit_on_user_error(lambda: train_gpt.main(cfg), "train_gpt") == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert "source_shards" in line and "--fid-ref" in line, (name, line)

    tokens = shutil.copytree(shapes_tokens, tmp_path / "tokens")   # the image shards moved: --fid-ref names them
    manifest = json.loads((tokens / "manifest.json").read_text())
    (tokens / "manifest.json").write_text(json.dumps({**manifest, "source_shards": str(tmp_path / "moved")}))
    run_script("train_gpt.py", *gpt_args(tokens, tmp_path / "gpt", 1, "--sample-count=0", "--eval-fid-samples=6",
                                          "--eval-batch-size=6", "--eval-fid", f"--inception-weights={weights}",
                                          f"--fid-ref={image_sets['b_png']}"))
    evals = [r for r in read_metrics(tmp_path / "gpt") if r["kind"] == "eval"]
    assert len(evals) == 1 and evals[0]["gfid"] > 0


@pytest.mark.slow
def test_two_ranks_under_torchrun_equal_one_process(gpt_run, image_sets, weights, tmp_path):
    results = {}
    for nproc in (0, 2):
        out = tmp_path / f"result_{nproc}.json"
        run_script("evaluate.py", f"--gpt={gpt_run}", f"--ref={image_sets['b_png']}", "--num-samples=12", "--batch-size=4",
                   f"--inception-weights={weights}", f"--save-samples={tmp_path / f'samples_{nproc}'}",
                   f"--save-npz={tmp_path / f'samples_{nproc}.npz'}", f"--out={out}", "--device=cpu",
                   "--progress=false", nproc=nproc)
        results[nproc] = json.loads(out.read_text())
    assert results[2]["world_size"] == 2
    for key in ("fid", "sfid", "precision", "recall", "isc_mean", "isc_std", "images", "ref_images"):
        assert results[2][key] == results[0][key], key
    with np.load(tmp_path / "samples_0.npz") as one, np.load(tmp_path / "samples_2.npz") as two:   # gathered in order
        assert one["arr_0"].shape[0] == 12 and np.array_equal(one["arr_0"], two["arr_0"])
    one, two = sorted((tmp_path / "samples_0").glob("*.png")), sorted((tmp_path / "samples_2").glob("*.png"))
    assert [p.name for p in one] == [p.name for p in two] and len(one) == 12
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(one, two))


def test_fid_ref_is_checked_when_parsed_and_at_start(shapes_shards, weights, tmp_path, capsys):
    import train_resnet_vqgan
    from vqgpt.settings import VQGAN_TRAIN_PRESETS, VQGANTrainConfig

    def config(*flags):
        return parse_config(VQGANTrainConfig, VQGAN_TRAIN_PRESETS,
                            vqgan_args(shapes_shards, tmp_path / "run", 1, *flags, "--device=cpu"))

    with pytest.raises(SystemExit) as exited:   # nothing would read it
        config(f"--fid-ref={shapes_shards}")
    assert exited.value.code == 2 and "--fid-ref is the reference of --eval-fid" in capsys.readouterr().err
    cfg = config("--eval-fid", f"--inception-weights={weights}", f"--fid-ref={tmp_path / 'nowhere'}")
    assert exit_on_user_error(lambda: train_resnet_vqgan.main(cfg), "train_resnet_vqgan") == 2
    assert "--fid-ref" in capsys.readouterr().err and not (tmp_path / "run").exists()


SPY = """import os, runpy, sys
from vqgpt import fid
spy_dir = sys.argv.pop(1)
real_features = fid.Inception.features

def features(self, images):   # which rank ran Inception on how many images
    with open(os.path.join(spy_dir, "rank" + os.environ.get("RANK", "0")), "a") as log:
        log.write(f"{len(images)} ")
    return real_features(self, images)

fid.Inception.features = features
runpy.run_path("train_resnet_vqgan.py", run_name="__main__")
"""


@pytest.mark.slow
def test_trainer_reference_statistics_are_extracted_by_every_rank(weights, tmp_path):
    shards = tmp_path / "shapes"
    write_shards(builtin_source("shapes", 14), shards, size=32, shard_size=100, val_count=6, workers=1, progress=False)
    spy = tmp_path / "spy.py"
    spy.write_text(SPY)
    (tmp_path / "calls").mkdir()
    run_script(str(spy), str(tmp_path / "calls"), *vqgan_args(shards, tmp_path / "vqgan", 1, "--eval-fid", "--eval-batch-size=2",
               f"--inception-weights={weights}", "--device=cpu"), nproc=2)
    # rank 1 ran the reference's middle batch of 2 (the reconstructions are scored on rank 0 alone)
    assert (tmp_path / "calls" / "rank1").read_text().split() == ["2"]
    [cache] = shards.glob("fid_stats_val_*.npz")
    one = fid.reference_statistics(str(shards), "val", fid.load_inception(str(weights)), 2, use_cache=False)
    with np.load(cache) as cached:
        np.testing.assert_allclose(cached["mu"], one.stats["mu"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(cached["sigma"], one.stats["sigma"], rtol=1e-5, atol=1e-6)
        assert int(cached["count"]) == 6


@pytest.mark.slow
def test_trainers_log_fid_and_plot_it(weights, tmp_path, monkeypatch):
    shards = tmp_path / "shapes"
    write_shards(builtin_source("shapes", 36), shards, size=32, shard_size=100, val_count=6, workers=1, progress=False)
    fid_flags = ["--eval-fid", f"--inception-weights={weights}"]
    run_script("train_resnet_vqgan.py", f"--data={shards}", f"--out={tmp_path / 'vqgan'}", "--max-steps=2",
               *VQGAN_TEST_FLAGS, *fid_flags)
    evals = [r for r in read_metrics(tmp_path / "vqgan") if r["kind"] == "eval"]
    assert len(evals) == 1 and evals[0]["rfid"] > 0 and len(list(shards.glob("fid_stats_val_*.npz"))) == 1
    other = tmp_path / "other"   # --fid-ref: the reference is another set's val split, its statistics cached there
    write_shards(builtin_source("shapes", 36), other, size=32, shard_size=100, val_count=6, seed=1, workers=1,
                 progress=False)
    run_script("train_resnet_vqgan.py", f"--data={shards}", f"--out={tmp_path / 'vqgan-ref'}", "--max-steps=2",
               *VQGAN_TEST_FLAGS, *fid_flags, f"--fid-ref={other}")
    against_other = [r for r in read_metrics(tmp_path / "vqgan-ref") if r["kind"] == "eval"]
    assert len(list(other.glob("fid_stats_val_*.npz"))) == 1 and against_other[0]["rfid"] != evals[0]["rfid"]

    tokens = tmp_path / "tokens"
    run_script("image_quantizer.py", f"--vqgan={tmp_path / 'vqgan'}", f"--data={shards}", f"--out={tokens}",
               "--progress=false")
    run_script("train_gpt.py", *gpt_args(tokens, tmp_path / "gpt", 2, "--sample-count=0", "--eval-fid-samples=6",
                                          "--eval-batch-size=6", *fid_flags))
    evals = [r for r in read_metrics(tmp_path / "gpt") if r["kind"] == "eval"]
    assert len(evals) == 1 and evals[0]["gfid"] > 0
    assert len(list(shards.glob("fid_stats_train_*.npz"))) == 1

    drawn = run_script("-m", "plots", str(tmp_path / "vqgan"), str(tmp_path / "gpt"), f"--out={tmp_path / 'figures'}")
    assert "val rFID" in drawn.stdout and "gFID" in drawn.stdout

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    missing = run_script("train_resnet_vqgan.py", f"--data={shards}", f"--out={tmp_path / 'nofid'}", "--max-steps=2",
                         *VQGAN_TEST_FLAGS, "--eval-fid", check=False)
    assert missing.returncode == 2 and fid.INCEPTION_WEIGHTS_FILE in missing.stderr
    assert not (tmp_path / "nofid").exists()
