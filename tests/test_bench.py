"""Every bench script runs at a tiny size and ends with one JSON object holding its documented figures, each
positive and finite, the sizes it was asked for, and derived figures that agree with the ones they come from."""
import json
import math

import pytest

from tests.helpers import run_script

pytestmark = pytest.mark.slow   # each bench script in its own interpreter, one under torchrun

RAW_256 = 256 * 256 * 3   # bytes of one 256 px uint8 image


def ratio_of(figures: dict, key: str, numerator: str, denominator: str) -> None:
    """figures[key] == numerator / denominator, up to the JSON's rounding to 4 decimals."""
    expected = figures[numerator] / figures[denominator]
    assert figures[key] == pytest.approx(expected, rel=2e-3, abs=2e-4), key


def check_shards(f: dict) -> None:
    assert f["bytes_per_image_256"] >= RAW_256          # a shard holds every pixel, uncompressed
    assert f["overhead_vs_raw_pct"] == pytest.approx(100 * (f["bytes_per_image_256"] / RAW_256 - 1), abs=2e-4)
    assert f["float32_shard_size_ratio"] == pytest.approx(4 * RAW_256 / f["bytes_per_image_256"], abs=2e-4)
    ratio_of(f, "reader_speedup_vs_jpeg_decode", "reader_images_per_s", "reference_jpeg_decode_images_per_s")
    ratio_of(f, "reader_permuted_vs_plain", "reader_permuted_channels_images_per_s", "reader_images_per_s")


def check_shardify(f: dict) -> None:
    assert (f["jpegs"], f["size"]) == (6, 32)
    for resize in ("lanczos", "adm"):
        ratio_of(f, f"{resize}_speedup_all_vs_w1", f"{resize}_images_per_s_all", f"{resize}_images_per_s_w1")
        hours, rate = f[f"{resize}_imagenet_hours_w1"], f[f"{resize}_images_per_s_w1"]
        assert hours * rate * 3600 == pytest.approx(1_281_167, rel=1e-3)


def check_vqgan_step(f: dict) -> None:
    assert (f["preset"], f["batch_size"], f["threads"]) == ("tiny", 2, 1)
    ratio_of(f, "speedup_vs_reference", "images_per_s", "reference_images_per_s")
    ratio_of(f, "bf16_speedup", "images_per_s_bf16", "images_per_s")
    ratio_of(f, "muon_vs_adam", "images_per_s_muon", "images_per_s")
    assert f["achieved_gflops"] == pytest.approx(f["gflops_per_step"] * f["images_per_s"] / 2, rel=2e-3)
    ratio_of(f, "mfu", "achieved_gflops", "gemm_peak_gflops")
    ratio_of(f, "mfu_vs_conv_peak", "achieved_gflops", "conv3x3_peak_gflops")


def check_quantizer(f: dict) -> None:
    assert (f["preset"], f["batch_size"]) == ("tiny", 8)
    ratio_of(f, "pipeline_vs_forward", "images_per_s", "forward_images_per_s")


def check_gpt(f: dict) -> None:
    assert (f["preset"], f["batch_size"], f["tokens_per_image"]) == ("tiny", 2, 64)
    for way in ("kv", "recompute"):   # each way samples the whole batch: rate x seconds = 2 x 64 tokens
        assert f[f"sample_tokens_per_s_{way}"] * f[f"sample_seconds_{way}"] == pytest.approx(2 * 64, rel=5e-3)
    ratio_of(f, "kv_speedup", "sample_tokens_per_s_kv", "sample_tokens_per_s_recompute")
    ratio_of(f, "bf16_speedup", "train_tokens_per_s_bf16", "train_tokens_per_s")
    ratio_of(f, "scaling_2_ranks", "train_tokens_per_s_2_ranks", "train_tokens_per_s")
    # gflops_per_token is printed with 4 decimals (about 0.005 on tiny): 1% leeway
    mfu = f["train_tokens_per_s"] * f["gflops_per_token"] / f["gemm_peak_gflops"]
    assert f["mfu"] == pytest.approx(mfu, rel=2e-2)


def check_evaluate(f: dict) -> None:
    assert (f["images"], f["samples"], f["batch_size"], f["image_size"]) == (4, 2, 2, 64)
    assert (f["decoded_image_size"] // 8) ** 2 == f["gpt_tokens_per_image"]   # b64 decodes 8 px a token


BENCHES = [
    ("bench/shards.py", ["--jpegs", "12", "--builtin", "64", "--reader-images", "256", "--batch-size", "16"],
     ["shardify_builtin32_images_per_s_w1", "bytes_per_image_256", "reader_images_per_s",
      "reader_speedup_vs_jpeg_decode"], check_shards),
    ("bench/shardify.py", ["--jpegs", "6", "--size", "32"],
     ["lanczos_images_per_s_w1", "lanczos_images_per_s_all", "adm_images_per_s_all", "lanczos_imagenet_hours_all"],
     check_shardify),
    ("bench/vqgan_step.py", ["--preset", "tiny", "--batch-size", "2", "--steps", "1", "--ranks", "0", "--muon"],
     ["images_per_s", "gflops_per_step", "mfu", "speedup_vs_reference", "images_per_s_bf16", "bf16_speedup",
      "images_per_s_muon", "muon_vs_adam"], check_vqgan_step),
    ("bench/quantizer.py", ["--preset", "tiny", "--batch-size", "8", "--images", "64"],
     ["images_per_s", "forward_images_per_s", "pipeline_vs_forward"], check_quantizer),
    ("bench/gpt.py", ["--preset", "tiny", "--batch-size", "2", "--steps", "1", "--ranks", "2"],   # + torchrun ranks
     ["train_tokens_per_s", "mfu", "train_tokens_per_s_bf16", "bf16_speedup", "sample_tokens_per_s_kv",
      "sample_tokens_per_s_recompute", "scaling_2_ranks",
      "scaling_2_ranks_without_allreduce"], check_gpt),
    ("bench/evaluate.py", ["--images", "4", "--samples", "2", "--batch-size", "2", "--ranks", "0"],
     ["extract_images_per_s", "generate_decode_images_per_s"], check_evaluate),
]


@pytest.mark.parametrize("script, args, keys, check", BENCHES, ids=[b[0] for b in BENCHES])
def test_bench_prints_its_figures_as_one_json_line(script, args, keys, check):
    result = run_script(script, *args)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for key in keys:
        assert key in figures and 0 < figures[key] < math.inf, key
    check(figures)


def test_the_block_bench_trains_both_blocks_per_seed_and_reports_what_its_runs_logged(shapes_shards, tiny_vqgan_run,
                                                                                       tmp_path):
    """bench/gpt_blocks.py on the built-in shapes and a tiny VQGAN: per-seed figures, their means and ratios agree."""
    data, vqgans = tmp_path / "data", tmp_path / "vqgans"
    data.mkdir(), vqgans.mkdir()
    (data / "clipart").symlink_to(shapes_shards)
    (vqgans / "clipart-ours").symlink_to(tiny_vqgan_run)
    out = tmp_path / "out"
    args = ["--data-root", str(data), "--vqgan-root", str(vqgans), "--out", str(out), "--sets", "clipart",
            "--seeds", "0", "1", "--steps", "3", "--batch-size", "4", "--warmup-steps", "1", "--llama-shape", "2,2,32"]
    f = json.loads(run_script("bench/gpt_blocks.py", *args).stdout.strip().splitlines()[-1])
    assert (f["steps"], f["batch_size"], f["seeds"]) == (3, 4, [0, 1])
    assert f["clipart_val_sequences"] == 100 and f["clipart_train_sequences"] == 2 * 700   # train + mirror images
    assert f["clipart_uniform_loss"] == pytest.approx(math.log(256), abs=1e-4)          # the tiny VQGAN's codes
    assert f["clipart_gpt2_parameters"] > f["clipart_llama_parameters"] > 0               # 4 x 128 vs 2 x 32
    for arch in ("gpt2", "llama"):
        for key in ("val_loss", "tokens_per_s", "mfu"):
            per_seed = f[f"clipart_{arch}_{key}_per_seed"]
            assert len(per_seed) == 2 and all(0 < v < math.inf for v in per_seed), (arch, key)
            assert f[f"clipart_{arch}_{key}"] == pytest.approx(sum(per_seed) / 2, abs=2e-4)
        # 3 steps from the init: near a uniform guess over the codes, neither learned nor diverged
        assert all(abs(v - f["clipart_uniform_loss"]) < 1.0 for v in f[f"clipart_{arch}_val_loss_per_seed"])
        assert all(m < 1 for m in f[f"clipart_{arch}_mfu_per_seed"])
        assert f[f"clipart_{arch}_val_loss_per_seed"][0] != f[f"clipart_{arch}_val_loss_per_seed"][1]   # two seeds
    for key in ("val_loss", "tokens_per_s", "mfu"):
        ratio_of(f, f"clipart_{key}_llama_vs_gpt2", f"clipart_llama_{key}", f"clipart_gpt2_{key}")
    gaps = [a - b for a, b in zip(f["clipart_llama_val_loss_per_seed"], f["clipart_gpt2_val_loss_per_seed"])]
    assert f["clipart_val_loss_gap_per_seed"] == pytest.approx(gaps, abs=2e-4)
    # a rerun trains nothing: it reuses the four finished runs and reports the same losses
    again = run_script("bench/gpt_blocks.py", *args).stdout
    assert "train_gpt.py" not in again
    assert json.loads(again.strip().splitlines()[-1])["clipart_gpt2_val_loss"] == f["clipart_gpt2_val_loss"]
