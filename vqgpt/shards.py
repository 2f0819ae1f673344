"""The shard format, its writer, and the one reader every stage uses.

A shard folder holds `{split}_NNNNN.npy` arrays (N, *item_shape) — uint8 images (N, H, W, 3) or
uint16/int32 token grids (N, h*w) — optional `{split}_NNNNN_labels.npy` beside them, and
`manifest.json`, written last, that lists every shard with its count and sha256.

The reader memory-maps shards, hands each rank a disjoint slice of a per-(seed, epoch)
permutation and keeps a global sample cursor, so a run resumed from `state_dict()` sees
exactly the samples an uninterrupted run would have seen, whatever the world size.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from vqgpt.errors import ShardError
from vqgpt.files import atomic_path, atomic_write_json, file_inside, sha256_file

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "vqgpt-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
ALLOWED_DTYPES = ("uint8", "uint16", "int32")


def shard_stem(split: str, index: int) -> str:
    return f"{split}_{index:05d}"


def label_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.int16) if num_classes <= np.iinfo(np.int16).max else np.dtype(np.int32)


def holds_shards(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return folder.is_dir() and ((folder / MANIFEST_NAME).exists() or any(folder.glob("*_[0-9][0-9][0-9][0-9][0-9].npy")))


def save_npy_atomic(path: Path, array: np.ndarray) -> str:
    """np.save through a temporary file; returns the sha256 of what was written."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)
    return sha256_file(path)


class ShardWriter:
    """Streams items of one split into fixed-size shards; holds at most one shard in memory."""

    def __init__(self, dest: str | os.PathLike, split: str, item_shape: tuple[int, ...], dtype,
                 shard_size: int, num_classes: int = 0, first_index: int = 0):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.dest = Path(dest)
        self.split = split
        self.item_shape = tuple(item_shape)
        self.dtype = np.dtype(dtype)
        self.shard_size = shard_size
        self.num_classes = num_classes
        self.next_index = first_index
        self.records: list[dict] = []
        self._items = np.empty((shard_size, *self.item_shape), dtype=self.dtype)
        self._labels = np.empty((shard_size,), dtype=label_dtype(num_classes)) if num_classes else None
        self._filled = 0

    def add(self, item: np.ndarray, label: int | None = None) -> None:
        if item.shape != self.item_shape:
            raise ValueError(f"item shape {item.shape} != shard item shape {self.item_shape}")
        self._items[self._filled] = item
        if self._labels is not None:
            self._labels[self._filled] = label
        self._filled += 1
        if self._filled == self.shard_size:
            self.flush()

    def flush(self) -> None:
        if self._filled == 0:
            return
        record = self.write_shard(self.dest, shard_stem(self.split, self.next_index), self._items[: self._filled],
                                  None if self._labels is None else self._labels[: self._filled])
        self.records.append(record)
        self.next_index += 1
        self._filled = 0

    @staticmethod
    def write_shard(dest: Path, stem: str, items: np.ndarray, labels: np.ndarray | None) -> dict:
        """Write `{stem}.npy` (and `{stem}_labels.npy`) atomically; return the manifest record."""
        name = f"{stem}.npy"
        record = {"file": name, "count": int(len(items)), "sha256": save_npy_atomic(Path(dest) / name, items)}
        if labels is not None:
            labels_name = f"{stem}_labels.npy"
            record["labels_file"] = labels_name
            record["labels_sha256"] = save_npy_atomic(Path(dest) / labels_name, labels)
        return record

    def close(self) -> list[dict]:
        self.flush()
        return self.records


def build_manifest(kind: str, item_shape, dtype, splits: dict[str, list[dict]], classes: list[str],
                   **extra) -> dict:
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "kind": kind,
        "dtype": np.dtype(dtype).name,
        "item_shape": list(item_shape),
        "classes": list(classes),
        "splits": {split: {"count": sum(r["count"] for r in records), "shards": records}
                   for split, records in splits.items()},
    }
    manifest.update(extra)
    return manifest


def write_manifest(dest: str | os.PathLike, manifest: dict) -> None:
    atomic_write_json(Path(dest) / MANIFEST_NAME, manifest)


def read_manifest(root: str | os.PathLike) -> dict:
    root = Path(root)
    if not root.is_dir():
        raise ShardError(f"{root}: no such shard folder")
    path = file_inside(root, MANIFEST_NAME, ShardError)
    if not path.is_file():
        raise ShardError(f"{path}: missing; this folder holds no finished shards (run shardify.py, or rerun it to complete)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardError(f"{path}: not valid JSON ({err})") from None
    except RecursionError:
        raise ShardError(f"{path}: not a {FORMAT_NAME} manifest (JSON nested too deeply)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ShardError(f"{path}: not a {FORMAT_NAME} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise ShardError(f"{path}: format version {manifest.get('version')!r}, this code reads {FORMAT_VERSION}")
    if manifest.get("dtype") not in ALLOWED_DTYPES:
        raise ShardError(f"{path}: dtype {manifest.get('dtype')!r} is not one of {ALLOWED_DTYPES}")
    shape = manifest.get("item_shape")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ShardError(f"{path}: item_shape {shape!r} is not a list of positive ints")
    if not isinstance(manifest.get("splits"), dict) or not isinstance(manifest.get("classes", []), list):
        raise ShardError(f"{path}: 'splits' or 'classes' malformed")
    _check_kind(manifest, path)
    _check_splits(manifest, path)
    if manifest.get("kind") == "tokens":
        _check_token_fields(manifest, path)
    return manifest


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_splits(manifest: dict, path: Path) -> None:
    """Each split an object with a shard list; no file listed twice, in one split or across two."""
    listed: dict[str, str] = {}
    for split, entry in manifest["splits"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("shards"), list) or not _is_count(entry.get("count")):
            raise ShardError(f"{path}: split {split!r} is not an object with a count and a shard list")
        for record in entry["shards"]:
            if not isinstance(record, dict):
                raise ShardError(f"{path}: shard record {str(record)[:60]!r} in split {split!r} is not an object")
            for key in ("file", "labels_file"):
                name = record.get(key)
                if name is None:
                    continue
                if not isinstance(name, str):
                    raise ShardError(f"{path}: {key} {str(name)[:60]!r} in split {split!r} is not a file name")
                if name in listed:
                    where = "twice" if listed[name] == split else f"in both {listed[name]!r} and {split!r}"
                    raise ShardError(f"{path}: {name} is listed {where}; every shard must appear once")
                listed[name] = split


def _check_kind(manifest: dict, path: Path) -> None:
    """Images are uint8 (S, S, 3), tokens (h*w,): other data would be trained on as if it were."""
    kind, dtype, shape = manifest.get("kind"), manifest["dtype"], manifest["item_shape"]
    if kind == "images":
        if dtype != "uint8" or len(shape) != 3 or shape[0] != shape[1] or shape[2] != 3:
            raise ShardError(f"{path}: images must be uint8 (S, S, 3), the manifest says {dtype}{shape}; "
                             "re-shard with shardify.py")
    elif kind == "tokens":
        if len(shape) != 1:
            raise ShardError(f"{path}: token grids are (h*w,), the manifest says {dtype}{shape}; "
                             "re-quantize with image_quantizer.py")
    else:
        raise ShardError(f"{path}: kind {str(kind)[:40]!r} is neither 'images' nor 'tokens'")


def _check_token_fields(manifest: dict, path: Path) -> None:
    for key in ("vqgan_checkpoint", "vqgan_sha256", "source_shards"):   # opened and compared as strings later
        if key in manifest and not isinstance(manifest[key], str):
            raise ShardError(f"{path}: {key} {str(manifest[key])[:60]!r} is not a string")
    if not all(isinstance(name, str) for name in manifest.get("classes", [])):
        raise ShardError(f"{path}: classes {str(manifest['classes'])[:60]!r} are not all names")
    codebook_size = manifest.get("codebook_size")
    if codebook_size is not None and not (_is_count(codebook_size) and codebook_size > 0):
        raise ShardError(f"{path}: codebook_size {codebook_size!r} is not a positive int")
    grid = manifest.get("latent_grid")
    if grid is not None and not (isinstance(grid, list) and len(grid) == 2 and all(_is_count(d) and d > 0 for d in grid)
                                 and grid[0] * grid[1] == manifest["item_shape"][0]):
        raise ShardError(f"{path}: latent_grid {grid!r} is not two positive ints whose product is the "
                         f"{manifest['item_shape'][0]} tokens per image")


def _image_shape(manifest: dict, path: Path) -> tuple[int, ...]:
    """What an image shard's reader returns: images stored larger than their `image_size` (shardify --stored-size)
    are read as image-size crops."""
    stored = tuple(manifest["item_shape"])
    size = manifest.get("image_size", stored[0])
    if len(stored) != 3 or stored[0] != stored[1]:
        return stored
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= stored[0]:
        raise ShardError(f"{path}: image_size {size!r} is not a whole number of pixels up to the stored {stored[0]}")
    return (size, size, stored[2])


def _resolve_inside(root: Path, name, manifest_path: Path) -> Path:
    """A manifest is untrusted: only plain .npy file names that stay inside the folder are accepted."""
    if not isinstance(name, str) or not name.endswith(".npy"):
        raise ShardError(f"{manifest_path}: shard name {str(name)[:80]!r} is not a plain .npy file name inside {root}")
    path = file_inside(root, name, ShardError, named_in=str(manifest_path))
    if not path.is_file():
        raise ShardError(f"{path}: listed in {manifest_path.name} but missing")
    return path


@dataclass(frozen=True)
class Shard:
    items_path: Path
    count: int
    sha256: str
    labels_path: Path | None
    labels_sha256: str | None = None


class ShardSplit:
    """One validated split of a shard folder; items are memory-mapped, read only where indexed. Opening reads the
    manifest and each file's .npy header (dtype, shape); `verify_hashes` also reads every file whole for its sha256."""

    def __init__(self, root: str | os.PathLike, split: str, verify_hashes: bool = False):
        self.root = Path(root)
        self.split = split
        self.manifest = read_manifest(self.root)
        manifest_path = self.root / MANIFEST_NAME
        if split not in self.manifest["splits"]:
            raise ShardError(f"{manifest_path}: has no {split!r} split (has {sorted(self.manifest['splits'])})")
        self.stored_shape = tuple(self.manifest["item_shape"])   # as the files hold an item
        self.item_shape = self.stored_shape                       # as read() returns one
        if self.manifest.get("kind") == "images":
            self.item_shape = _image_shape(self.manifest, manifest_path)
        self.dtype = np.dtype(self.manifest["dtype"])
        self.classes: list[str] = list(self.manifest.get("classes", []))
        entry = self.manifest["splits"][split]   # read_manifest checked its shape: a list of record objects
        self.shards: list[Shard] = []
        self._items: list[np.ndarray] = []
        self._labels: list[np.ndarray | None] = []
        for record in entry["shards"]:
            self._open_shard(record, manifest_path, verify_hashes)
        counts = [s.count for s in self.shards]
        if entry.get("count") != sum(counts):
            raise ShardError(f"{manifest_path}: split {split!r} count {entry.get('count')} != sum of shard counts {sum(counts)}")
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def _open_shard(self, record: dict, manifest_path: Path, verify_hashes: bool) -> None:
        items_path = _resolve_inside(self.root, record.get("file"), manifest_path)
        count = record.get("count")
        if not _is_count(count) or count <= 0:
            raise ShardError(f"{manifest_path}: {items_path.name} has invalid count {count!r}")
        items = self._load(items_path)
        if items.shape != (count, *self.stored_shape) or items.dtype != self.dtype:
            raise ShardError(f"{items_path}: holds {items.dtype}{list(items.shape)}, manifest says "
                             f"{self.dtype}{[count, *self.stored_shape]}")
        codebook_size = self.manifest.get("codebook_size") if self.manifest.get("kind") == "tokens" else None
        if codebook_size is not None:
            # ids equal to a class or start token, or beyond the vocabulary, would be trained on silently. The range
            # the quantizer recorded is trusted (its bytes are what --verify checks); older manifests: read it
            recorded = record.get("token_range")
            if recorded is None:
                recorded = [int(items.min()), int(items.max())]
            if not (isinstance(recorded, list) and len(recorded) == 2):
                raise ShardError(f"{manifest_path}: token_range {str(recorded)[:40]!r} of {items_path.name} is not "
                                 "[lowest id, highest id]")
            low, high = recorded
            if not (_is_count(low) and _is_count(high)) or high >= codebook_size:
                raise ShardError(f"{items_path}: token ids {low}..{high} outside the codebook [0, {codebook_size}); "
                                 "re-quantize with the VQGAN named in the manifest")
        labels_path = None
        labels = None
        if self.classes:
            labels_path = _resolve_inside(self.root, record.get("labels_file"), manifest_path)
            labels = self._load(labels_path)
            if labels.shape != (count,) or labels.dtype.kind not in "iu":
                raise ShardError(f"{labels_path}: holds {labels.dtype}{list(labels.shape)}, expected {count} integer labels")
            if count and (labels.min() < 0 or labels.max() >= len(self.classes)):
                raise ShardError(f"{labels_path}: labels outside [0, {len(self.classes)})")
        self.shards.append(Shard(items_path, count, record.get("sha256", ""), labels_path, record.get("labels_sha256")))
        self._items.append(items)
        self._labels.append(labels)
        if verify_hashes:
            self.verify_shard(len(self.shards) - 1)

    def verify_shard(self, shard_index: int) -> None:
        """Read the shard (and its labels) whole and check the sha256s the manifest lists: bytes changed under an
        unchanged manifest are refused, not trained on."""
        shard = self.shards[shard_index]
        for path, expected in ((shard.items_path, shard.sha256), (shard.labels_path, shard.labels_sha256)):
            if path is not None and sha256_file(path) != expected:
                raise ShardError(f"{path}: sha256 does not match {MANIFEST_NAME}; the file changed or is corrupt "
                                 "(re-make the folder, or restore the file)")

    @staticmethod
    def _load(path: Path) -> np.ndarray:
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except EOFError:
            raise ShardError(f"{path}: not a readable .npy array (empty or truncated file)") from None
        except (OSError, ValueError) as err:
            raise ShardError(f"{path}: not a readable .npy array ({err})") from None
        if not isinstance(array, np.ndarray):   # an .npz archive renamed .npy
            if hasattr(array, "close"):
                array.close()
            raise ShardError(f"{path}: not a .npy array (a {type(array).__name__}, e.g. an .npz archive)")
        return array

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def has_labels(self) -> bool:
        return bool(self.classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def fingerprint(self) -> str:
        """sha256 over the shards' own sha256s, in order: other data of the same size differs here."""
        return hashlib.sha256("\n".join(s.sha256 for s in self.shards).encode()).hexdigest()

    @property
    def crop_room(self) -> int:
        """How many pixels larger than the images read the stored images are (0: read whole)."""
        return self.stored_shape[0] - self.item_shape[0]

    def centre_corners(self, count: int) -> np.ndarray:
        return np.full((count, 2), self.crop_room // 2, dtype=np.int64)

    def shard_arrays(self, shard_index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """A shard's items as stored (uncropped) and its labels."""
        return self._items[shard_index], self._labels[shard_index]

    def read(self, indices: np.ndarray, corners: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Gather items (and labels) at global indices, in the given order. Images stored larger than they are read
        come back as crops whose (top, left) corners are `corners` (int (N, 2)), by default the centre."""
        indices = np.asarray(indices, dtype=np.int64)
        items = np.empty((len(indices), *self.item_shape), dtype=self.dtype)
        labels = np.empty((len(indices),), dtype=np.int64) if self.has_labels else None
        shard_of = np.searchsorted(self.offsets, indices, side="right") - 1
        local = indices - self.offsets[shard_of]
        size = self.item_shape[0]
        if self.crop_room and corners is None:
            corners = self.centre_corners(len(indices))
        for row in np.lexsort((local, shard_of)):   # file order: sequential reads on a cold cache
            item = self._items[shard_of[row]][local[row]]
            if self.crop_room:
                top, left = corners[row]
                item = item[top:top + size, left:left + size]
            items[row] = item   # one copy, straight from the page cache
            if labels is not None:
                labels[row] = self._labels[shard_of[row]][local[row]]
        return items, labels

    def iter_batches(self, batch_size: int, start: int = 0, stop: int | None = None
                     ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """Items [start, stop) in order, in batches (for evaluation and quantization)."""
        stop = len(self) if stop is None else stop
        for begin in range(start, stop, batch_size):
            yield self.read(np.arange(begin, min(begin + batch_size, stop)))


def put_unless_stopped(out: queue.Queue, item, stop: threading.Event) -> bool:
    """A reader thread's put: blocks while the queue is full, but gives up (False) once the consumer has set
    `stop`, so a thread never hangs on a queue nobody reads any more."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 stays uint8 (images); uint16 tokens widen to int32, which torch handles everywhere."""
    if array.dtype == np.uint16:
        array = array.astype(np.int32)
    return torch.from_numpy(np.ascontiguousarray(array))


# the six orders of the RGB channels, identity first; ShardLoader(permute_channels=True) gives each image one
CHANNEL_ORDERS = np.array(list(itertools.permutations(range(3))))
# the share of images whose channels leave RGB order when all six orders are alike
ALL_ORDERS_ALIKE = 5 / 6
# how an epoch's channel orders are drawn, saved with the reader's position: 2 draws once per image (1 drew an
# unused six-way order first); a resume replays only the draw it was made with
CHANNEL_DRAW = 2


def reorder_channels(images: np.ndarray, channel_orders: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 with image i's channels in the order CHANNEL_ORDERS[channel_orders[i]]."""
    out = np.empty_like(images)
    # one strided plane copy at a time: 20x faster than np.take_along_axis with a broadcast index
    for i, order in enumerate(CHANNEL_ORDERS[channel_orders]):
        for dst, src in enumerate(order):
            out[i, ..., dst] = images[i, ..., src]
    return out


class EpochPlan(NamedTuple):
    """What one epoch does (or, sliced, one rank's batch of it): which sample comes at each position and
    what is done to it."""
    order: np.ndarray                    # sample index at each position of the epoch
    flips: np.ndarray | None             # per position: mirror the image left-right
    channel_orders: np.ndarray | None    # per position: the row of CHANNEL_ORDERS its channels take
    corners: np.ndarray | None = None    # per position: (top, left) of its crop, for images stored larger


@dataclass
class Batch:
    items: torch.Tensor            # uint8 (B, H, W, 3) images or int32 (B, L) tokens
    labels: torch.Tensor | None    # int64 (B,)
    epoch: int
    cursor: int                    # global samples of this epoch consumed once this batch is used


class ShardLoader:
    """Rank-aware, deterministic, resumable batches from a ShardSplit, prefetched in a thread.

    Epoch e is `permutation(seed, e)` of all samples. Step k of an epoch uses the global chunk
    `perm[k*B*W : (k+1)*B*W]`; rank r takes its r-th slice of B. The position is the global
    cursor (epoch, samples consumed), which does not depend on the world size. The augmentations
    (flips, channel orders, and random crops of images stored larger than they are read) are drawn with the
    epoch's order, so they resume and split across ranks too.
    """

    def __init__(self, split: ShardSplit, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, flip: bool = False, permute_channels: bool = False,
                 permuted_share: float = ALL_ORDERS_ALIKE, device: torch.device | str = "cpu", prefetch: int = 4,
                 grad_accum: int = 1):
        if batch_size * world_size * grad_accum > len(split):   # (accumulation: one optimizer step's samples)
            raise ShardError(f"{split.root}: split {split.split!r} has {len(split)} samples, fewer than one "
                             f"global batch ({batch_size} x {world_size} ranks"
                             + (f" x {grad_accum} micro-steps)" if grad_accum > 1 else ")"))
        self.split = split
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.flip = flip and len(split.item_shape) == 3
        self.permute_channels = permute_channels and len(split.item_shape) == 3
        if not 0 <= permuted_share <= 1:
            raise ValueError(f"permuted_share must be in [0, 1], got {permuted_share}")
        self.permuted_share = permuted_share
        self.device = torch.device(device)
        self.prefetch = prefetch
        self.epoch = 0
        self.cursor = 0
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return len(self.split) // self.global_batch

    def epoch_plan(self, epoch: int) -> EpochPlan:
        """The order of one epoch and what is done to each image, identical on every rank."""
        rng = np.random.default_rng([self.seed, epoch])
        count = len(self.split)
        order = rng.permutation(count) if self.shuffle else np.arange(count)
        flips = rng.random(count) < 0.5 if self.flip else None
        channel_orders = None
        if self.permute_channels:   # drawn after the flips: runs without it see the data of runs before it existed
            permuted = rng.random(count) < self.permuted_share
            channel_orders = np.where(permuted, rng.integers(1, len(CHANNEL_ORDERS), count), 0)
        # drawn last, and only for images stored larger: sets stored at their image size see the data they always did
        corners = rng.integers(0, self.split.crop_room + 1, (count, 2)) if self.split.crop_room else None
        return EpochPlan(order, flips, channel_orders, corners)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "num_samples": len(self.split),
                "shards_sha256": self.split.fingerprint, "channel_draw": CHANNEL_DRAW}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or not all(isinstance(state.get(k), int) and not isinstance(state.get(k), bool)
                                                  for k in ("epoch", "cursor", "seed", "num_samples")):
            raise ShardError(f"{self.split.root}: the checkpoint's reader state {str(state)[:80]!r} is malformed")
        if state["num_samples"] != len(self.split):
            raise ShardError(f"{self.split.root}: split {self.split.split!r} has {len(self.split)} samples but "
                             f"the checkpoint was made on {state['num_samples']}; resume on the same data")
        if state.get("shards_sha256", self.split.fingerprint) != self.split.fingerprint:   # older checkpoints: no key
            raise ShardError(f"{self.split.root}: split {self.split.split!r} holds other shards than the checkpoint "
                             "was made on (same size, other content); resume on the same data or start a new --out")
        if self.permute_channels and state.get("channel_draw") != CHANNEL_DRAW:
            raise ShardError(f"{self.split.root}: the checkpoint's run drew its channel orders the way vqgpt did "
                             "before 2026-12-07; they cannot be replayed: start a new --out (or --init-from it)")
        self.close()
        self.epoch, self.cursor, self.seed = int(state["epoch"]), int(state["cursor"]), int(state["seed"])

    def _positions(self, epoch: int, cursor: int) -> Iterator[tuple[int, int, EpochPlan]]:
        while True:
            if cursor + self.global_batch > len(self.split):  # the tail that no full global batch covers
                epoch, cursor = epoch + 1, 0
            plan = self.epoch_plan(epoch)
            while cursor + self.global_batch <= len(self.split):
                begin = cursor + self.rank * self.batch_size
                rows = slice(begin, begin + self.batch_size)
                cursor += self.global_batch
                yield epoch, cursor, EpochPlan(*(None if part is None else part[rows] for part in plan))

    def _make_batch(self, epoch: int, cursor: int, plan: EpochPlan) -> Batch:
        items, labels = self.split.read(plan.order, plan.corners)
        if plan.flips is not None and plan.flips.any():
            items[plan.flips] = items[plan.flips, :, ::-1]
        if plan.channel_orders is not None:
            items = reorder_channels(items, plan.channel_orders)
        items_tensor = to_tensor(items)
        labels_tensor = None if labels is None else torch.from_numpy(labels)
        if self.device.type == "cuda":
            items_tensor = items_tensor.pin_memory()
            labels_tensor = None if labels_tensor is None else labels_tensor.pin_memory()
        return Batch(items_tensor, labels_tensor, epoch, cursor)

    def _produce(self, out: queue.Queue, stop: threading.Event, epoch: int, cursor: int) -> None:
        try:
            for position in self._positions(epoch, cursor):
                if not put_unless_stopped(out, self._make_batch(*position), stop):
                    return
        except BaseException as err:  # hand the failure to the consumer instead of hanging it
            put_unless_stopped(out, err, stop)

    def __iter__(self) -> "ShardLoader":
        return self

    def __next__(self) -> Batch:
        if self._thread is None:
            self._stop = threading.Event()
            self._queue = queue.Queue(maxsize=max(1, self.prefetch))
            self._thread = threading.Thread(target=self._produce, daemon=True,
                                            args=(self._queue, self._stop, self.epoch, self.cursor))
            self._thread.start()
        batch = self._queue.get()
        if isinstance(batch, BaseException):
            self.close()
            raise batch
        self.epoch, self.cursor = batch.epoch, batch.cursor
        return batch

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None
            self._queue = None
