"""Benchmark image_quantizer: whole-pipeline images/s vs the encoder+quantizer forward alone.

    taskset -c 0 python bench/quantizer.py --preset b64 --batch-size 8

Both are measured in the same run on the same batch size: `images_per_s` runs quantize() on real
shards (reading, encoding, writing, hashing, manifest); `forward_images_per_s` encodes one
in-memory batch over and over. Their ratio shows whether I/O hides behind compute.
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import emit, single_process_device, timed  # noqa: E402
from models.vqgan import VQGAN, VQGAN_PRESETS  # noqa: E402
from vqgpt.dataprep import builtin_source, write_shards  # noqa: E402
from vqgpt.distributed import DistInfo  # noqa: E402
from vqgpt.quantize import quantize  # noqa: E402
from vqgpt.trained_models import load_vqgan  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="b64", choices=sorted(VQGAN_PRESETS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device, dtype = single_process_device(args.device)
    config = VQGAN_PRESETS[args.preset]
    results = {"preset": args.preset, "batch_size": args.batch_size, "device": str(device)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_shards(builtin_source("shapes", args.images), tmp / "shards", size=config.image_size, shard_size=100,
                     val_count=args.images // 10, workers=2, progress=False)
        torch.manual_seed(0)
        checkpoint = tmp / "vqgan.pt"
        torch.save({"stage": "vqgan", "step": 0, "config": dataclasses.asdict(config),
                    "vqgan": VQGAN(config).state_dict()}, checkpoint)
        vqgan = load_vqgan(checkpoint, device)

        images = torch.rand(args.batch_size, 3, config.image_size, config.image_size, device=device) * 2 - 1

        @torch.inference_mode()
        def forward():
            vqgan.model.encode_to_indices(images)
            if device.type == "cuda":
                torch.cuda.synchronize()
        results["forward_images_per_s"] = args.batch_size / timed(forward, repeats=9, warmup=2)

        dist = DistInfo(0, 0, 1, device, True)
        quantize(vqgan, tmp / "shards", tmp / "warm", batch_size=args.batch_size, flip=False, dist=dist,
                 dtype=dtype, progress=False)   # warm-up run: page cache, kernels
        shutil.rmtree(tmp / "warm")
        start = time.perf_counter()
        quantize(vqgan, tmp / "shards", tmp / "tokens", batch_size=args.batch_size, flip=False, dist=dist,
                 dtype=dtype, progress=False)
        results["images_per_s"] = args.images / (time.perf_counter() - start)
    results["pipeline_vs_forward"] = results["images_per_s"] / results["forward_images_per_s"]
    emit(results)


if __name__ == "__main__":
    main()
