"""Pack an image folder (or the built-in dataset) into uint8 numpy shards with a manifest.

    python shardify.py ~/pictures data/pictures --size 256
    python shardify.py ~/pets data/pets --size 128 --val-count 500 --labels auto   # sub-folders = classes
    python shardify.py --builtin shapes data/shapes --size 32                      # no download needed

Output: DEST/{train,val}_NNNNN.npy uint8 (N, size, size, 3), DEST/..._labels.npy when there are
classes, and DEST/manifest.json (written last). Unusable files are skipped and listed there.
"""
from __future__ import annotations

import argparse
import sys

from vqgpt.dataprep import builtin_source, scan_folder, summarize, write_shards
from vqgpt.errors import exit_on_user_error


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="SRC DEST", help="image folder and output folder (DEST only with --builtin)")
    parser.add_argument("--builtin", choices=["shapes"], help="draw the built-in labelled dataset instead of reading SRC")
    parser.add_argument("--builtin-count", type=int, default=4000, help="images in the built-in dataset (default: 4000)")
    parser.add_argument("--size", type=int, default=None, help="output side in pixels (default: 256, or 32 with --builtin)")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard file (default: 1000)")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--val-fraction", type=float, default=0.01, help="share of images for validation (default: 0.01)")
    split.add_argument("--val-count", type=int, default=None, help="exact number of validation images")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split/order shuffle (default: 0)")
    parser.add_argument("--labels", choices=["auto", "none"], default="auto",
                        help="auto: first-level sub-folders are classes; none: no labels (default: auto)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in DEST")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    expected = 1 if args.builtin else 2
    if len(args.paths) != expected:
        parser.error("give DEST with --builtin" if args.builtin else "give SRC and DEST")
    if args.size is None:
        args.size = 32 if args.builtin else 256
    if args.size < 8 or args.shard_size < 1:
        parser.error("--size must be >= 8 and --shard-size >= 1")
    if args.seed < 0 or args.builtin_count < 1 or (args.workers is not None and args.workers < 1):
        parser.error("--seed must not be negative, --builtin-count and --workers must be at least 1")
    if not 0 <= args.val_fraction < 1 or (args.val_count is not None and args.val_count < 0):   # NaN fails too
        parser.error("--val-fraction must be in [0, 1) and --val-count must not be negative")
    return args


def shard(args: argparse.Namespace) -> int:
    if args.builtin:
        source, dest = builtin_source(args.builtin, args.builtin_count), args.paths[0]
    else:
        source, dest = scan_folder(args.paths[0], args.labels), args.paths[1]
    manifest = write_shards(source, dest, size=args.size, shard_size=args.shard_size,
                            val_fraction=args.val_fraction, val_count=args.val_count, seed=args.seed,
                            workers=args.workers, overwrite=args.overwrite, progress=not args.quiet)
    print(summarize(manifest, dest))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return exit_on_user_error(lambda: shard(args), "shardify")
    except KeyboardInterrupt:
        print("shardify: interrupted; DEST is as it was before this run", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
