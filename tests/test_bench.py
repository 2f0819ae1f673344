"""Every bench script runs at a tiny size and ends with one JSON object holding its documented figures."""
import json

import pytest

from tests.helpers import run_script

pytestmark = pytest.mark.slow   # each bench script in its own interpreter, one under torchrun

BENCHES = [
    ("bench/shards.py", ["--jpegs", "12", "--builtin", "64", "--reader-images", "256", "--batch-size", "16"],
     ["shardify_builtin32_images_per_s_w1", "bytes_per_image_256", "reader_images_per_s",
      "reader_speedup_vs_jpeg_decode"]),
    ("bench/vqgan_step.py", ["--preset", "tiny", "--batch-size", "2", "--steps", "1", "--ranks", "0", "--muon"],
     ["images_per_s", "gflops_per_step", "mfu", "speedup_vs_reference", "images_per_s_bf16", "bf16_speedup",
      "images_per_s_muon", "muon_vs_adam"]),
    ("bench/quantizer.py", ["--preset", "tiny", "--batch-size", "8", "--images", "64"],
     ["images_per_s", "forward_images_per_s", "pipeline_vs_forward"]),
    ("bench/gpt.py", ["--preset", "tiny", "--batch-size", "2", "--steps", "1", "--ranks", "2"],   # + torchrun ranks
     ["train_tokens_per_s", "mfu", "train_tokens_per_s_bf16", "bf16_speedup", "sample_tokens_per_s_kv",
      "sample_tokens_per_s_recompute", "scaling_2_ranks",
      "scaling_2_ranks_without_allreduce"]),
    ("bench/evaluate.py", ["--images", "4", "--samples", "2", "--batch-size", "2", "--ranks", "0"],
     ["extract_images_per_s", "generate_decode_images_per_s"]),
]


@pytest.mark.parametrize("script, args, keys", BENCHES, ids=[b[0] for b in BENCHES])
def test_bench_prints_its_figures_as_one_json_line(script, args, keys):
    result = run_script(script, *args)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for key in keys:
        assert key in figures and figures[key] > 0, key
