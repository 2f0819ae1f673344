"""Pack an image folder (or the built-in dataset) into uint8 numpy shards with a manifest.

    python shardify.py ~/pictures data/pictures --size 256
    python shardify.py ~/pets data/pets --size 128 --val-count 500 --labels auto   # sub-folders = classes
    python shardify.py --builtin shapes data/shapes --size 32                      # no download needed
    python shardify.py ~/imagenet/train data/in256 --resize adm   # ADM/LlamaGen's crop, for their FID references

Output: DEST/{train,val}_NNNNN.npy uint8 (N, size, size, 3), DEST/..._labels.npy when there are
classes, and DEST/manifest.json (written last). Unusable files are skipped and listed there.
An interrupted run (Ctrl-C, SIGTERM, a killed worker) leaves DEST as it was; rerunning the same
command keeps its finished shards and goes on. `--help` lists every setting.
"""
from __future__ import annotations

import signal
import sys

from vqgpt.config import parse_config

from vqgpt.settings import SHARDIFY_PRESETS, ShardifyConfig
from vqgpt.dataprep import builtin_source, scan_folder, summarize, write_shards
from vqgpt.errors import exit_on_user_error


def main(cfg: ShardifyConfig) -> int:
    stopped_by: list[int] = []

    def stop(signum, _frame):   # SIGTERM (kill, a job scheduler) unwinds like Ctrl-C: workers ended, DEST untouched
        stopped_by.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        source = builtin_source(cfg.builtin, cfg.builtin_count) if cfg.builtin else scan_folder(cfg.source, cfg.labels)
        manifest = write_shards(source, cfg.dest, size=cfg.image_size, stored_size=cfg.stored_size,
                                shard_size=cfg.shard_size,
                                val_fraction=0.01 if cfg.val_fraction is None else cfg.val_fraction,
                                val_count=cfg.val_count, seed=cfg.seed, resize=cfg.resize,
                                workers=cfg.workers or None, overwrite=cfg.overwrite, progress=cfg.progress)
    except KeyboardInterrupt:
        why = "stopped by SIGTERM" if stopped_by else "interrupted"
        print(f"shardify: {why}; DEST is as it was before this run; rerun the same command to go on from the "
              "finished shards", file=sys.stderr)
        return 128 + signal.SIGTERM if stopped_by else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(summarize(manifest, cfg.dest))
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(
        lambda: main(parse_config(ShardifyConfig, SHARDIFY_PRESETS, description=__doc__)), "shardify"))
