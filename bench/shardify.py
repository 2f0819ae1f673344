"""Benchmark shardify at ImageNet's shape: synthetic ~400x350 JPEGs -> 256 px shards, 1 worker vs all.

    python bench/shardify.py [--jpegs 400] [--size 256]

Each figure is the whole run (scan, decode, resize, write, hash, swap-in) over the same files, in the
same process; `imagenet_hours_*` is 1,281,167 images at that rate. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from bench.common import emit  # noqa: E402
from bench.shards import smooth_photo  # noqa: E402
from vqgpt.dataprep import available_cores, scan_folder, write_shards  # noqa: E402

IMAGENET_TRAIN = 1_281_167


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jpegs", type=int, default=400)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    cores = available_cores()
    results: dict = {"jpegs": args.jpegs, "size": args.size, "cores": cores}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "jpegs"
        src.mkdir()
        for i in range(args.jpegs):   # ImageNet's typical shape, landscape and portrait
            width, height = (400, 350) if i % 3 else (350, 400)
            Image.fromarray(smooth_photo(i, height, width)).save(src / f"{i:05d}.jpg", quality=90)
        results["jpeg_kb"] = sum(p.stat().st_size for p in src.iterdir()) / args.jpegs / 1024
        source = scan_folder(src)
        for resize in ("lanczos", "adm"):
            for workers, tag in ((1, "w1"), (cores, "all")):
                start = time.perf_counter()
                write_shards(source, Path(tmp) / "out", size=args.size, val_count=0, resize=resize,
                             workers=workers, overwrite=True, progress=False)
                rate = args.jpegs / (time.perf_counter() - start)
                results[f"{resize}_images_per_s_{tag}"] = rate
                results[f"{resize}_imagenet_hours_{tag}"] = IMAGENET_TRAIN / rate / 3600
            results[f"{resize}_speedup_all_vs_w1"] = (results[f"{resize}_images_per_s_all"]
                                                      / results[f"{resize}_images_per_s_w1"])
    emit(results)


if __name__ == "__main__":
    main()
