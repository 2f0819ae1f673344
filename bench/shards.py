"""Benchmark stage 0: shardify throughput, bytes per image, and the shard reader's throughput.

    python bench/shards.py [--jpegs 300] [--reader-images 2000]

Reference measured in the same run: decoding the same 256 px images from JPEG files one by one
(what a folder-of-images loader does each epoch). Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import emit  # noqa: E402
from vqgpt.dataprep import builtin_source, scan_folder, write_shards  # noqa: E402
from vqgpt.shards import ShardLoader, ShardSplit, ShardWriter, build_manifest, write_manifest  # noqa: E402


def smooth_photo(seed: int, height: int = 384, width: int = 512) -> np.ndarray:
    """A photo-like JPEG source: low-frequency colour fields plus fine noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((height // 32 + 1, width // 32 + 1, 3))
    image = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC))
    noise = rng.normal(0, 6, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def timed_shardify(source, dest: Path, size: int, workers: int) -> float:
    start = time.perf_counter()
    write_shards(source, dest, size=size, val_count=0, workers=workers, overwrite=True, progress=False)
    return len(source) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jpegs", type=int, default=300)
    parser.add_argument("--builtin", type=int, default=2000)
    parser.add_argument("--reader-images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict = {"cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        builtin = builtin_source("shapes", args.builtin)
        for workers in (1, 2):
            results[f"shardify_builtin32_images_per_s_w{workers}"] = timed_shardify(builtin, tmp / "b", 32, workers)

        jpeg_dir = tmp / "jpegs"
        jpeg_dir.mkdir()
        for i in range(args.jpegs):
            Image.fromarray(smooth_photo(i)).save(jpeg_dir / f"{i:05d}.jpg", quality=90)
        source = scan_folder(jpeg_dir)
        for workers in (1, 2):
            results[f"shardify_jpeg256_images_per_s_w{workers}"] = timed_shardify(source, tmp / "j", 256, workers)
        manifest = json.loads((tmp / "j" / "manifest.json").read_text())
        shard_bytes = sum((tmp / "j" / r["file"]).stat().st_size for r in manifest["splits"]["train"]["shards"])
        per_image = shard_bytes / manifest["splits"]["train"]["count"]
        results["bytes_per_image_256"] = per_image
        results["overhead_vs_raw_pct"] = 100 * (per_image / (256 * 256 * 3) - 1)
        results["float32_shard_size_ratio"] = (256 * 256 * 3 * 4) / per_image

        # reference: decode + resize JPEG files one at a time, as an image-folder loader does
        from vqgpt.images import load_square_image
        files = sorted(jpeg_dir.glob("*.jpg"))
        start = time.perf_counter()
        for path in files:
            load_square_image(path, 256)
        results["reference_jpeg_decode_images_per_s"] = len(files) / (time.perf_counter() - start)

        reader_dir = tmp / "r"
        reader_dir.mkdir()
        rng = np.random.default_rng(0)
        per_shard = min(500, args.reader_images)
        block = rng.integers(0, 255, (per_shard, 256, 256, 3), dtype=np.uint8)
        records = [ShardWriter.write_shard(reader_dir, f"train_{k:05d}", block, None)
                   for k in range(max(1, args.reader_images // per_shard))]
        write_manifest(reader_dir, build_manifest("images", (256, 256, 3), np.uint8, {"train": records}, []))
        split = ShardSplit(reader_dir, "train")
        for _ in split.iter_batches(500):   # warm the page cache: the target is reading from cache
            pass
        batches = len(split) // args.batch_size * 2
        for key, permute in (("reader_images_per_s", False), ("reader_permuted_channels_images_per_s", True)):
            loader = ShardLoader(split, args.batch_size, seed=0, flip=True, permute_channels=permute, prefetch=4)
            next(loader)
            start = time.perf_counter()
            for _ in range(batches):
                next(loader)
            results[key] = batches * args.batch_size / (time.perf_counter() - start)
            loader.close()
        # --permute-channels (the b64 preset's until e45a415): one more copy of each batch on the reader thread
        results["reader_permuted_vs_plain"] = results["reader_permuted_channels_images_per_s"] / results["reader_images_per_s"]
    results["reader_speedup_vs_jpeg_decode"] = results["reader_images_per_s"] / results["reference_jpeg_decode_images_per_s"]
    emit(results)


if __name__ == "__main__":
    main()
