"""Image folder (or the built-in dataset) -> uint8 image shards + manifest.

Split and order are a shuffle of the sorted file list under `seed`, decoding runs in a process
pool whose results come back in order, so the same input always gives byte-identical output.
The set is built in DEST/.shardify-staging, where each finished shard gets a receipt (its record,
sha256 and where it ends in the split's order): a rerun of an interrupted run keeps the shards whose
bytes still match and goes on from there, and a rerun with other settings or inputs starts over.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import PIL

from vqgpt import builtin
from vqgpt.errors import DataPrepError
from vqgpt.files import atomic_write_json, sha256_file
from vqgpt.images import IMAGE_SUFFIXES, RESIZE_METHODS, SkipImage, load_square_image
from vqgpt.runlog import progress as progress_bar
from vqgpt.shards import (MANIFEST_NAME, ShardError, ShardWriter, build_manifest, read_manifest, shard_stem,
                          write_manifest)

_OUR_FILES = re.compile(r"^(train|val)_\d{5}(_labels)?\.npy$")
STAGING_NAME = ".shardify-staging"   # the new set is built here and moved into DEST only once complete
PREVIOUS_NAME = ".shardify-previous"   # the replaced set waits here until the new one is in
RUN_NAME = "run.json"   # in the staging folder: what the staged shards were made from
RECEIPTS_NAME = "receipts"   # in the staging folder: one {split}_NNNNN.json per finished shard


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


def available_cores() -> int:
    """The cores this process may run on (a container's or taskset's share), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _decode_file(task: tuple[str, int], root: str, size: int, resize: str) -> tuple[np.ndarray | None, str]:
    relative, _ = task
    try:
        return load_square_image(os.path.join(root, relative), size, resize), ""
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


def _staging_for(dest: Path, run: dict) -> Path:
    """DEST/.shardify-staging: an interrupted run's when it was made from the same `run`, else a new one."""
    staging = dest / STAGING_NAME
    if staging.is_symlink() or staging.is_file():
        staging.unlink()
    elif staging.exists() and _read_json(staging / RUN_NAME) != run:
        if (staging / RECEIPTS_NAME).is_dir() and any((staging / RECEIPTS_NAME).iterdir()):
            print(f"shardify: {staging} holds shards of a run with other settings or inputs; starting over")
        shutil.rmtree(staging)
    if not staging.exists():
        staging.mkdir()
        atomic_write_json(staging / RUN_NAME, run)
    (staging / RECEIPTS_NAME).mkdir(exist_ok=True)
    return staging


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None


def _run_identity(source: Source, size: int, shard_size: int, n_val: int, seed: int, resize: str) -> dict:
    """Everything the staged bytes depend on; a rerun resumes only when all of it is the same."""
    listing = hashlib.sha256(json.dumps([source.files, source.labels, source.classes]).encode()).hexdigest()
    return {"source": source.root, "builtin_count": source.builtin_count, "files_sha256": listing, "size": size,
            "shard_size": shard_size, "val_count": n_val, "seed": seed, "resize": resize,
            "pillow": PIL.__version__, "numpy": np.__version__}


def _kept_shards(staging: Path, split: str, split_length: int) -> tuple[list[dict], int, list[dict]]:
    """The split's leading shards whose receipts and bytes check out: (records, items consumed, skipped)."""
    records: list[dict] = []
    end, skipped = 0, []
    while True:
        stem = shard_stem(split, len(records))
        receipt = _read_json(staging / RECEIPTS_NAME / f"{stem}.json")
        if not (isinstance(receipt, dict) and isinstance(receipt.get("record"), dict)
                and isinstance(receipt.get("end"), int) and end < receipt["end"] <= split_length
                and isinstance(receipt.get("skipped"), list) and receipt["record"].get("file") == f"{stem}.npy"):
            return records, end, skipped
        record = receipt["record"]
        for name_key, hash_key in (("file", "sha256"), ("labels_file", "labels_sha256")):
            name = record.get(name_key)
            if name is None:
                continue
            path = staging / str(name)
            if path.is_symlink() or not path.is_file() or sha256_file(path) != record.get(hash_key):
                return records, end, skipped
        records.append(record)
        end = receipt["end"]
        skipped.extend(receipt["skipped"])


def _discard_unreceipted(staging: Path, records: dict[str, list[dict]]) -> None:
    """Shards past the kept ones, receipts without their shard, temporaries of a killed writer: all redone."""
    kept = {name for split_records in records.values() for record in split_records
            for name in (record.get("file"), record.get("labels_file")) if name}
    receipts = {f"{record['file'][:-len('.npy')]}.json" for split_records in records.values()
                for record in split_records}
    for path in staging.iterdir():
        if path.name in kept or path.name in (RUN_NAME, RECEIPTS_NAME):
            continue
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    for path in (staging / RECEIPTS_NAME).iterdir():
        if path.name not in receipts:
            path.unlink()


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
            if path.name in (RUN_NAME, RECEIPTS_NAME):
                continue
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


def _worker_signals(parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's to handle, once
    signal.signal(signal.SIGTERM, signal.SIG_DFL)   # not the parent's handler, inherited through fork
    if sys.platform.startswith("linux"):   # a parent killed with -9 takes its workers along: no orphans
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
        if os.getppid() != parent:   # it died before the line above
            os._exit(1)


@contextlib.contextmanager
def _decoding_pool(workers: int):
    """A process pool (inline for one worker) whose workers are terminated, not waited for, when the run stops.

    concurrent.futures, not multiprocessing.Pool: a worker that dies (the OOM killer's SIGKILL) breaks the pool
    (BrokenProcessPool) instead of silently losing its task and hanging the run."""
    if workers <= 1:
        yield _InlinePool()
        return
    context = multiprocessing.get_context("spawn" if os.name == "nt" else "fork")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_signals, initargs=(os.getpid(),))
    try:
        yield pool
    except BaseException:
        processes = list((pool._processes or {}).values())   # no public terminate() before Python 3.14
        for process in processes:
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.join()
        raise
    pool.shutdown()


def _bounded_map(pool, decode: Callable, tasks: list, window: int) -> Iterable:
    """pool.map over at most two windows of tasks at a time: decoded images cannot pile up when writing is slower."""
    windows = (tasks[begin:begin + window] for begin in range(0, len(tasks), window))
    pending = pool.map(decode, next(windows, []), chunksize=16)
    for upcoming in windows:
        current, pending = pending, pool.map(decode, upcoming, chunksize=16)
        yield from current
    yield from pending


def write_shards(source: Source, dest: str | os.PathLike, *, size: int, stored_size: int = 0, shard_size: int = 1000,
                 val_fraction: float = 0.01, val_count: int | None = None, seed: int = 0, resize: str = "lanczos",
                 workers: int | None = None, overwrite: bool = False, progress: str | bool = True) -> dict:
    """Decode, split and write every image of `source` into a staging folder, then swap it into DEST.

    DEST keeps its previous shard set (and every other file) until the new one is complete. A run that stops
    before that (signal, killed worker, crash) leaves its finished shards in the staging folder for the rerun.
    Images are stored at `stored_size` (default `size`); readers crop them to `size`.
    """
    dest = Path(dest)
    if len(source) == 0:
        raise DataPrepError(f"{source.root}: nothing to shard")
    if resize not in RESIZE_METHODS:
        raise DataPrepError(f"resize {resize!r} is not one of {RESIZE_METHODS}")
    n_val = resolve_val_count(len(source), val_fraction, val_count)
    replaced = check_destination(dest, overwrite, source)
    made_dest = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    stored_size = stored_size or size
    staging = _staging_for(dest, _run_identity(source, stored_size, shard_size, n_val, seed, resize))
    try:
        manifest = _write_set(source, staging, dest.name, size, shard_size, n_val, seed, resize,
                              workers or available_cores(), progress, stored_size)
    except DataPrepError:
        shutil.rmtree(staging, ignore_errors=True)   # a verdict on the input: nothing worth resuming
        _remove_if_made_empty(dest, made_dest)
        raise
    except BrokenProcessPool:
        raise DataPrepError("a decoding process died (killed by the system: out of memory?); the finished shards "
                            "are kept: rerun the same command, with fewer --workers if memory is short") from None
    except BaseException:   # a stop or an error: finished shards stay for the rerun; a staging without any goes
        if not (staging / RECEIPTS_NAME).is_dir() or not any((staging / RECEIPTS_NAME).iterdir()):
            shutil.rmtree(staging, ignore_errors=True)
            _remove_if_made_empty(dest, made_dest)
        raise
    try:
        with _stops_deferred():
            _swap_in(staging, dest, replaced)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _remove_if_made_empty(dest: Path, made_dest: bool) -> None:
    """A DEST this run created and left empty goes: a failed run leaves the file system as it found it."""
    if made_dest:
        try:
            dest.rmdir()
        except OSError:   # not empty (or gone): leave it
            pass


@contextlib.contextmanager
def _stops_deferred():
    """Ctrl-C and SIGTERM are ignored for the few renames of the swap-in, which then completes: stopped half-way,
    DEST would hold neither set's manifest. Python runs signal handlers in the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)   # None: set outside Python


def _write_set(source: Source, out: Path, title: str, size: int, shard_size: int, n_val: int, seed: int,
               resize: str, workers: int, progress: str | bool, stored_size: int) -> dict:
    if source.builtin_count:
        decode: Callable = functools.partial(_draw_builtin, seed=seed, size=stored_size)
        label_of: Callable[[int], int | None] = lambda i: builtin.shape_label(seed, i)
        name_of: Callable[[int], str] = lambda i: f"shapes/{i:06d}"
    else:
        decode = functools.partial(_decode_file, root=source.root, size=stored_size, resize=resize)
        label_of = (lambda i: source.labels[i]) if source.labels is not None else (lambda i: None)
        name_of = lambda i: source.files[i]
    orders = split_order(len(source), seed, n_val)
    kept = {split: _kept_shards(out, split, len(order)) for split, order in orders.items()}
    _discard_unreceipted(out, {split: records for split, (records, _, _) in kept.items()})
    done = sum(end for _, end, _ in kept.values())
    if done:
        print(f"shardify: resuming: {sum(len(r) for r, _, _ in kept.values())} finished shard(s) kept, "
              f"{done} of {len(source)} images done")
    skipped: list[dict] = [entry for _, _, split_skipped in kept.values() for entry in split_skipped]
    records: dict[str, list[dict]] = {}
    with _decoding_pool(workers) as pool, \
            progress_bar(progress, total=len(source), desc=f"shardify {title}", unit="img") as bar:
        bar.update(done)
        for split, order in orders.items():
            kept_records, end, _ = kept[split]
            writer = ShardWriter(out, split, (stored_size, stored_size, 3), np.uint8, shard_size, len(source.classes),
                                 first_index=len(kept_records))
            writer.records.extend(kept_records)
            order = order[end:]
            tasks = [(int(i), 0) for i in order] if source.builtin_count else [(source.files[i], int(i)) for i in order]
            since_receipt: list[dict] = []   # skipped since the last finished shard: its receipt carries them
            for position, ((image, reason), index) in enumerate(
                    zip(_bounded_map(pool, decode, tasks, max(64, 32 * workers)), order), start=end + 1):
                bar.update(1)
                if image is None:
                    since_receipt.append({"file": name_of(int(index)), "reason": reason})
                    continue
                finished = len(writer.records)
                writer.add(image, label_of(int(index)))
                if len(writer.records) > finished:
                    _write_receipt(out, writer.records[-1], position, since_receipt)
                    skipped.extend(since_receipt)
                    since_receipt = []
            finished = len(writer.records)
            records[split] = writer.close()
            if len(records[split]) > finished:
                _write_receipt(out, records[split][-1], end + len(order), since_receipt)
            skipped.extend(since_receipt)
    if not any(r["count"] for split_records in records.values() for r in split_records):
        raise DataPrepError(f"{source.root}: every one of {len(source)} files was skipped "
                            f"(first: {skipped[0]['file']}: {skipped[0]['reason']})")
    if n_val and not records["val"]:
        raise DataPrepError(f"{source.root}: all {n_val} validation images were skipped (first: "
                            f"{skipped[0]['file']}: {skipped[0]['reason']}); fix or remove them, or pass --val-count 0")
    resize_method = {} if source.builtin_count else {"resize": resize}   # built-in images are drawn at the size
    manifest = build_manifest("images", (stored_size, stored_size, 3), np.uint8, records, source.classes,
                              image_size=size, stored_size=stored_size,
                              source_root=Path(source.root).name if not source.builtin_count else source.root,
                              seed=seed, **resize_method, skipped=sorted(skipped, key=lambda s: s["file"]))
    write_manifest(out, manifest)
    return manifest


def _write_receipt(staging: Path, record: dict, end: int, skipped: list[dict]) -> None:
    """Written after its shard: a receipt vouches for a complete file and for the order up to `end`."""
    atomic_write_json(staging / RECEIPTS_NAME / f"{record['file'][:-len('.npy')]}.json",
                      {"record": record, "end": end, "skipped": skipped})


class _InlinePool:
    """Same interface as a Pool for --workers 1 (no process start-up, easy to debug)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def map(fn: Callable, tasks: Iterable, chunksize: int = 1):
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
