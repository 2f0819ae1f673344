"""Image folder (or the built-in dataset) -> uint8 image shards + manifest.

Split and order are a shuffle of the sorted file list under `seed`, decoding runs in a process
pool whose results come back in order, so the same input always gives byte-identical output.
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import re
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from vqgpt import builtin
from vqgpt.errors import DataPrepError
from vqgpt.images import IMAGE_SUFFIXES, SkipImage, load_square_image
from vqgpt.runlog import progress as progress_bar
from vqgpt.shards import MANIFEST_NAME, ShardError, ShardWriter, build_manifest, read_manifest, write_manifest

_OUR_FILES = re.compile(r"^(train|val)_\d{5}(_labels)?\.npy$")
STAGING_NAME = ".shardify-staging"   # the new set is built here and moved into DEST only once complete
PREVIOUS_NAME = ".shardify-previous"   # the replaced set waits here until the new one is in


@dataclass(frozen=True)
class Source:
    """What to shard: real files (relative to root) or `count` built-in images."""
    root: str
    files: list[str] = field(default_factory=list)    # posix paths relative to root, sorted
    labels: list[int] | None = None
    classes: list[str] = field(default_factory=list)
    builtin_count: int = 0

    def __len__(self) -> int:
        return self.builtin_count or len(self.files)


def scan_folder(root: str | os.PathLike, labels: str = "auto") -> Source:
    """Recursively list image files; with labels='auto', first-level sub-folders are classes."""
    root = Path(root)
    if not root.is_dir():
        raise DataPrepError(f"{root}: not a folder")
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataPrepError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    labelled = labels == "auto" and all("/" in f for f in files)
    if not labelled:
        return Source(str(root.resolve()), files)
    classes = sorted({f.split("/", 1)[0] for f in files})
    class_id = {name: i for i, name in enumerate(classes)}
    return Source(str(root.resolve()), files, [class_id[f.split("/", 1)[0]] for f in files], classes)


def builtin_source(name: str, count: int) -> Source:
    if name != "shapes":
        raise DataPrepError(f"unknown built-in dataset {name!r}; available: shapes")
    return Source(f"builtin:{name}", classes=list(builtin.SHAPE_CLASSES), builtin_count=count)


def split_order(num_items: int, seed: int, val_count: int) -> dict[str, np.ndarray]:
    order = np.random.default_rng(seed).permutation(num_items)
    return {"train": order[val_count:], "val": order[:val_count]}


def resolve_val_count(num_items: int, val_fraction: float, val_count: int | None) -> int:
    if val_count is None:
        val_count = max(1, round(num_items * val_fraction)) if val_fraction > 0 and num_items > 1 else 0
    if not 0 <= val_count < num_items:
        raise DataPrepError(f"val count {val_count} leaves no training images out of {num_items}")
    return val_count


def _decode_file(task: tuple[str, int], root: str, size: int) -> tuple[np.ndarray | None, str]:
    relative, _ = task
    try:
        return load_square_image(os.path.join(root, relative), size), ""
    except SkipImage as err:
        return None, str(err).replace(root + os.sep, "")   # the manifest must not change when SRC moves


def _draw_builtin(task: tuple[int, int], seed: int, size: int) -> tuple[np.ndarray | None, str]:
    index, _ = task
    image, _label = builtin.draw_shape(seed, index, size)
    return image, ""


def check_destination(dest: Path, overwrite: bool, source: Source) -> list[Path]:
    """Refuse any DEST whose files could be lost; return the old shard set (manifest first) that the swap replaces."""
    if not source.builtin_count and dest.resolve() == Path(source.root).resolve():
        raise DataPrepError(f"{dest}: DEST is the source folder; write the shards to another folder")
    if dest.exists() and not dest.is_dir():
        raise DataPrepError(f"{dest}: is a file, not a folder")
    if not dest.exists():
        return []
    replaced: list[Path] = []
    manifest_path = dest / MANIFEST_NAME
    if os.path.lexists(manifest_path):
        try:
            manifest = read_manifest(dest)
        except ShardError as err:
            raise DataPrepError(f"{err}; not replacing a manifest.json this tool did not write: "
                                "move it or choose another DEST") from None
        if not overwrite:
            raise DataPrepError(f"{dest}: already holds shards (manifest.json); pass --overwrite to replace them")
        replaced = [manifest_path] + [dest / name for entry in manifest["splits"].values() for record in entry["shards"]
                                      for name in (record.get("file"), record.get("labels_file"))
                                      if isinstance(name, str) and _OUR_FILES.match(name)]
    odd = [p.name for p in replaced if os.path.lexists(p) and (p.is_symlink() or not p.is_file())]
    if odd:
        raise DataPrepError(f"{dest / odd[0]}: listed in manifest.json as a shard but is a folder or link; move it "
                            "or choose another DEST (nothing was changed)")
    lookalikes = sorted(p.name for p in dest.iterdir() if _OUR_FILES.match(p.name) and p not in replaced)
    if lookalikes:
        raise DataPrepError(f"{dest}: holds {lookalikes[0]}{f' and {len(lookalikes) - 1} more' if len(lookalikes) > 1 else ''} "
                            "named like shards but listed in no manifest.json; move them or choose another DEST "
                            "(nothing was changed)")
    return replaced


def _fresh_staging(dest: Path) -> Path:
    staging = dest / STAGING_NAME
    if staging.is_symlink() or staging.is_file():
        staging.unlink()
    elif staging.exists():
        shutil.rmtree(staging)   # an interrupted run's
    staging.mkdir()
    return staging


def _swap_in(staging: Path, dest: Path, replaced: list[Path]) -> None:
    """Old set aside (manifest first), new set in, manifest last: a crash in between leaves no readable mixed
    set, and a failure puts the old set back before it is raised. The old set is deleted only at the end."""
    previous = dest / PREVIOUS_NAME
    if previous.is_symlink() or previous.is_file():
        previous.unlink()
    elif previous.exists():
        shutil.rmtree(previous)   # an interrupted swap's, whose set is back or replaced by now
    previous.mkdir()
    moved_aside: list[Path] = []
    moved_in: list[Path] = []
    try:
        for path in replaced:
            if os.path.lexists(path):
                os.replace(path, previous / path.name)
                moved_aside.append(path)
        for path in sorted(staging.iterdir(), key=lambda p: p.name == MANIFEST_NAME):   # the manifest last
            os.replace(path, dest / path.name)
            moved_in.append(dest / path.name)
    except OSError as err:
        for path in reversed(moved_in):
            os.replace(path, staging / path.name)
        for path in reversed(moved_aside):
            os.replace(previous / path.name, path)
        previous.rmdir()
        raise DataPrepError(f"{dest}: could not swap the new shard set in ({err}); the previous set is back "
                            "as it was") from None
    shutil.rmtree(previous, ignore_errors=True)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's to handle, once


def _bounded_imap(pool, decode: Callable, tasks: list, window: int) -> Iterable:
    """pool.imap over at most two windows of tasks at a time: decoded images cannot pile up when writing is slower."""
    windows = (tasks[begin:begin + window] for begin in range(0, len(tasks), window))
    pending = pool.imap(decode, next(windows, []), chunksize=16)
    for upcoming in windows:
        current, pending = pending, pool.imap(decode, upcoming, chunksize=16)
        yield from current
    yield from pending


def write_shards(source: Source, dest: str | os.PathLike, *, size: int, stored_size: int = 0, shard_size: int = 1000,
                 val_fraction: float = 0.01, val_count: int | None = None, seed: int = 0,
                 workers: int | None = None, overwrite: bool = False, progress: str | bool = True) -> dict:
    """Decode, split and write every image of `source` into a staging folder, then swap it into DEST.

    DEST keeps its previous shard set (and every other file) until the new one is complete. Images are stored at
    `stored_size` (default `size`); readers crop them to `size`.
    """
    dest = Path(dest)
    if len(source) == 0:
        raise DataPrepError(f"{source.root}: nothing to shard")
    n_val = resolve_val_count(len(source), val_fraction, val_count)
    replaced = check_destination(dest, overwrite, source)
    dest.mkdir(parents=True, exist_ok=True)
    staging = _fresh_staging(dest)
    try:
        manifest = _write_set(source, staging, dest.name, size, shard_size, n_val, seed, workers or os.cpu_count() or 1,
                              progress, stored_size or size)
        _swap_in(staging, dest, replaced)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _write_set(source: Source, out: Path, title: str, size: int, shard_size: int, n_val: int, seed: int,
               workers: int, progress: str | bool, stored_size: int) -> dict:
    if source.builtin_count:
        decode: Callable = functools.partial(_draw_builtin, seed=seed, size=stored_size)
        label_of: Callable[[int], int | None] = lambda i: builtin.shape_label(seed, i)
        name_of: Callable[[int], str] = lambda i: f"shapes/{i:06d}"
    else:
        decode = functools.partial(_decode_file, root=source.root, size=stored_size)
        label_of = (lambda i: source.labels[i]) if source.labels is not None else (lambda i: None)
        name_of = lambda i: source.files[i]
    skipped: list[dict] = []
    records: dict[str, list[dict]] = {}
    context = multiprocessing.get_context("spawn" if os.name == "nt" else "fork")
    with context.Pool(workers, initializer=_ignore_sigint) if workers > 1 else _InlinePool() as pool, \
            progress_bar(progress, total=len(source), desc=f"shardify {title}", unit="img") as bar:
        for split, order in split_order(len(source), seed, n_val).items():
            writer = ShardWriter(out, split, (stored_size, stored_size, 3), np.uint8, shard_size, len(source.classes))
            tasks = [(int(i), 0) for i in order] if source.builtin_count else [(source.files[i], int(i)) for i in order]
            for (image, reason), index in zip(_bounded_imap(pool, decode, tasks, max(64, 32 * workers)), order):
                bar.update(1)
                if image is None:
                    skipped.append({"file": name_of(int(index)), "reason": reason})
                    continue
                writer.add(image, label_of(int(index)))
            records[split] = writer.close()
    if not any(r["count"] for split_records in records.values() for r in split_records):
        raise DataPrepError(f"{source.root}: every one of {len(source)} files was skipped "
                            f"(first: {skipped[0]['file']}: {skipped[0]['reason']})")
    if n_val and not records["val"]:
        raise DataPrepError(f"{source.root}: all {n_val} validation images were skipped (first: "
                            f"{skipped[0]['file']}: {skipped[0]['reason']}); fix or remove them, or pass --val-count 0")
    manifest = build_manifest("images", (stored_size, stored_size, 3), np.uint8, records, source.classes,
                              image_size=size, stored_size=stored_size,
                              source_root=Path(source.root).name if not source.builtin_count else source.root,
                              seed=seed, skipped=sorted(skipped, key=lambda s: s["file"]))
    write_manifest(out, manifest)
    return manifest


class _InlinePool:
    """Same interface as a Pool for --workers 1 (no process start-up, easy to debug)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def imap(fn: Callable, tasks: Iterable, chunksize: int = 1):
        return map(fn, tasks)


def summarize(manifest: dict, dest: str | os.PathLike) -> str:
    lines = [f"{dest}: {manifest['image_size']}x{manifest['image_size']} uint8 shards"
             + (f", stored at {manifest['stored_size']}x{manifest['stored_size']} for random crops"
                if manifest.get("stored_size", manifest["image_size"]) != manifest["image_size"] else "")]
    for split, entry in manifest["splits"].items():
        lines.append(f"  {split:5s} {entry['count']:7d} images in {len(entry['shards'])} shard(s)")
    if manifest["classes"]:
        lines.append(f"  classes ({len(manifest['classes'])}): {', '.join(manifest['classes'])}")
    if manifest["skipped"]:
        lines.append(f"  skipped {len(manifest['skipped'])} file(s):")
        lines.extend(f"    {s['file']}: {s['reason']}" for s in manifest["skipped"][:20])
        if len(manifest["skipped"]) > 20:
            lines.append(f"    ... and {len(manifest['skipped']) - 20} more (see manifest.json)")
    return "\n".join(lines)
