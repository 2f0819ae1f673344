"""Image shards -> token shards bound to the VQGAN checkpoint that made them.

Each image shard becomes a token shard of the same name (uint16 (N, h*w) raster order, int32
for codebooks over 65,536 codes); `--flip` adds `train_flip_NNNNN.npy` shards of mirrored
images to the train split. Images stored larger than they are read (shardify --stored-size) are
encoded as their centre crop, and `--crops K` adds K sets of random crops, `train_cropJ_NNNNN.npy`,
whose corners follow from (J, image): the GPT reader takes every set as more samples, as it does the
mirrored set. A receipt per finished shard (TOKENS/.receipts/) records the source
shard's hash and the checkpoint's, so a rerun skips what is done and refuses foreign leftovers.
Ranks take every world_size-th job; rank 0 writes the manifest last.
"""
from __future__ import annotations

import json
import os
import queue
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from vqgpt import distributed
from vqgpt.distributed import DistInfo
from vqgpt.errors import RunError
from vqgpt.files import atomic_write_json, file_inside, remove_stale_temporaries, sha256_file
from vqgpt.images import to_unit_range
from vqgpt.metrics import codebook_usage
from vqgpt.runlog import progress as progress_bar
from vqgpt.shards import (MANIFEST_NAME, ShardSplit, ShardWriter, build_manifest, put_unless_stopped, read_manifest,
                          save_npy_atomic, write_manifest)
from vqgpt.trained_models import LoadedVQGAN, optimize_for_inference
from vqgpt.training import autocast
RECEIPTS_DIR = ".receipts"
HISTOGRAM_NAME = "codebook_histogram.npy"
USAGE_PLOT_NAME = "codebook_usage.png"


@dataclass(frozen=True)
class Job:
    split: str
    shard_index: int     # position in the source split's shard list
    out_name: str        # token shard file name
    flipped: bool
    crop: int = 0        # 0: the centre crop; J: the J-th set of random crops


def token_dtype(codebook_size: int) -> np.dtype:
    return np.dtype(np.uint16) if codebook_size <= 65536 else np.dtype(np.int32)


def plan_jobs(splits: dict[str, ShardSplit], flip: bool, crops: int = 0) -> list[Job]:
    jobs = []
    for split_name, split in splits.items():
        for index, shard in enumerate(split.shards):
            jobs.append(Job(split_name, index, shard.items_path.name, False))
            if flip and split_name == "train":
                jobs.append(Job(split_name, index, shard.items_path.name.replace("train_", "train_flip_"), True))
            for crop in range(1, crops + 1) if split_name == "train" else ():
                jobs.append(Job(split_name, index, shard.items_path.name.replace("train_", f"train_crop{crop}_"), False,
                                crop))
    return jobs


def crop_corners(split: ShardSplit, shard_index: int, crop: int) -> np.ndarray | None:
    """(top, left) of each image's crop in one shard: the centre (crop 0), or the crop-th random set's corners, drawn
    from (crop, shard) alone so every rank and every rerun draws the same, and a shard draws only its own images'.
    None: nothing to crop."""
    if not split.crop_room:
        return None
    count = int(split.offsets[shard_index + 1] - split.offsets[shard_index])
    if crop == 0:
        return split.centre_corners(count)
    return np.random.default_rng([crop, shard_index]).integers(0, split.crop_room + 1, (count, 2))


def binding(vqgan: LoadedVQGAN, data: Path) -> dict:
    """What ties token shards to their inputs: the checkpoint, which of its weights (trained or EMA), and the
    source manifest."""
    return {"vqgan_sha256": vqgan.sha256, "vqgan_weights": vqgan.weights,
            "source_manifest_sha256": sha256_file(data / MANIFEST_NAME)}


def bound_value(record: dict, key: str):
    """A binding as a manifest or receipt records it; those older than the weight EMA were made with raw weights."""
    return record.get(key, "raw" if key == "vqgan_weights" else None)


def check_destination(out: Path, bound: dict, flip: bool, jobs: list[Job], crops: int = 0) -> None:
    """Refuse a TOKENS folder made from other data, another checkpoint, --flip or --crops, and one holding a file
    this run would write that no token manifest or receipt of this tool lists (a user's own file)."""
    ours: set[str] = set()
    if (out / MANIFEST_NAME).exists():
        manifest = read_manifest(out)
        for key, value in bound.items():
            if bound_value(manifest, key) != value:
                raise RunError(f"{out}: holds tokens made from another {key.split('_')[0]} "
                               f"({key} differs); choose another --out or delete it")
        if bool(manifest.get("flip")) != flip:
            raise RunError(f"{out}: was made with flip={manifest.get('flip')}; rerun with the same --flip or another --out")
        if manifest.get("crops", 0) != crops:
            raise RunError(f"{out}: was made with --crops {manifest.get('crops', 0)}; rerun with the same --crops or "
                           "another --out")
        ours |= {HISTOGRAM_NAME, USAGE_PLOT_NAME} | {record.get(key) for entry in manifest["splits"].values()
                                                     for record in entry["shards"] for key in ("file", "labels_file")}
    receipts = out / RECEIPTS_DIR
    if receipts.is_symlink():
        raise RunError(f"{receipts}: is a link; a token folder's receipts stay inside it (remove the link)")
    for receipt_path in sorted(receipts.glob("*.json")) if receipts.is_dir() else []:
        receipt = read_receipt(receipt_path)
        if receipt is not None and any(bound_value(receipt, k) != v for k, v in bound.items()):
            raise RunError(f"{out}: holds unfinished tokens from another checkpoint or data ({receipt_path.name}); "
                           "choose another --out or delete it")
        if receipt is not None:   # an unfinished run of ours: its shards, and what its last step writes
            ours |= {receipt.get("file"), receipt.get("labels_file"), HISTOGRAM_NAME, USAGE_PLOT_NAME}
    planned = {HISTOGRAM_NAME, USAGE_PLOT_NAME} | {name for job in jobs for name in (job.out_name, labels_name(job))}
    foreign = sorted(name for name in planned - ours if os.path.lexists(out / name))
    if foreign:
        raise RunError(f"{out}: holds {foreign[0]}{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''} that "
                       "this run would write over, listed in no token manifest or receipt of this tool; move them or "
                       "choose another --out (nothing was changed)")


def read_receipt(path: Path) -> dict | None:
    """A receipt, or None when it is unreadable or edited into another shape (its shard is then redone); a link
    out of the receipts folder is refused."""
    path = file_inside(path.parent, path.name, RunError)
    try:
        receipt = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return receipt if isinstance(receipt, dict) else None


def receipt_matches(out: Path, job: Job, source_sha256: str, bound: dict, count: int) -> dict | None:
    path = out / RECEIPTS_DIR / (job.out_name + ".json")
    tokens_path = file_inside(out, job.out_name, RunError)
    if not path.is_file() or not tokens_path.is_file():
        return None
    receipt = read_receipt(path)
    if receipt is None or receipt.get("source_sha256") != source_sha256 or \
            any(bound_value(receipt, k) != v for k, v in bound.items()):
        return None
    labels_file = receipt.get("labels_file")
    if receipt.get("file") != job.out_name or receipt.get("count") != count or \
            labels_file not in (None, labels_name(job)) or not _is_range(receipt.get("token_range")):   # edited by hand
        return None
    if sha256_file(tokens_path) != receipt.get("sha256"):
        return None
    if labels_file:
        labels_path = file_inside(out, labels_file, RunError)
        if not labels_path.is_file() or sha256_file(labels_path) != receipt.get("labels_sha256"):
            return None
    return receipt


def labels_name(job: Job) -> str:
    return job.out_name[:-len(".npy")] + "_labels.npy"


def _is_range(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def background_batches(items: np.ndarray, batch_size: int, flipped: bool, pin: bool, depth: int = 3,
                       corners: np.ndarray | None = None, size: int = 0) -> Iterator[torch.Tensor]:
    """Read (and crop to `size` at `corners`, flip, pin) the next batches in a thread while the current one is
    encoded."""
    out: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()   # set when the consumer is done or failed

    def produce():
        try:
            for begin in range(0, len(items), batch_size):
                batch = items[begin:begin + batch_size]
                if corners is not None:
                    batch = np.stack([item[top:top + size, left:left + size]
                                      for item, (top, left) in zip(batch, corners[begin:begin + batch_size])])
                # one copy out of the memory map (read-only: torch must not share it), flipped on the way
                tensor = torch.from_numpy(np.array(batch[:, :, ::-1] if flipped else batch, order="C"))
                if not put_unless_stopped(out, tensor.pin_memory() if pin else tensor, stop):
                    return
            put_unless_stopped(out, None, stop)
        except BaseException as err:
            put_unless_stopped(out, err, stop)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (batch := out.get()) is not None:
            if isinstance(batch, BaseException):
                raise batch
            yield batch
    finally:
        stop.set()
        thread.join(timeout=5)


@dataclass(frozen=True)
class Encoder:
    """How images become codes: the VQGAN's encode_to_indices, possibly compiled, and the input memory format."""
    encode: Callable[[torch.Tensor], torch.Tensor]
    memory_format: torch.memory_format = torch.contiguous_format

    @classmethod
    def of(cls, vqgan: LoadedVQGAN, compile: bool = False, channels_last: bool = False) -> "Encoder":
        model = optimize_for_inference(vqgan.model, compile=compile, channels_last=channels_last)
        return cls(model.encode_to_indices, torch.channels_last if channels_last else torch.contiguous_format)


@torch.inference_mode()
def encode_shard(vqgan: LoadedVQGAN, items: np.ndarray, batch_size: int, flipped: bool, device: torch.device,
                 dtype: torch.dtype, encoder: Encoder | None = None, corners: np.ndarray | None = None
                 ) -> np.ndarray:
    """uint8 (N, H, W, 3) images (cropped to the VQGAN's size at `corners` when given) -> (N, h*w) token ids in the
    codebook's dtype."""
    encoder = encoder or Encoder(vqgan.model.encode_to_indices)
    out_dtype = token_dtype(vqgan.config.codebook_size)
    h, w = vqgan.model.latent_grid
    tokens = np.empty((len(items), h * w), dtype=out_dtype)
    filled = 0
    for batch in background_batches(items, batch_size, flipped, pin=device.type == "cuda", corners=corners,
                                    size=vqgan.config.image_size):
        images = to_unit_range(batch.to(device, non_blocking=True)).contiguous(memory_format=encoder.memory_format)
        with autocast(device, dtype):
            indices = encoder.encode(images)
        tokens[filled:filled + len(batch)] = indices.cpu().numpy().astype(out_dtype)
        filled += len(batch)
    return tokens


def quantize(vqgan: LoadedVQGAN, data: str | Path, out: str | Path, *, batch_size: int, flip: bool,
             dist: DistInfo, dtype: torch.dtype, progress: str | bool = True, encoder: Encoder | None = None,
             plot_usage: Callable[[np.ndarray, Path], None] | None = None, crops: int = 0) -> dict | None:
    """Write every token shard of this rank's jobs; rank 0 then writes the manifest (returned), after
    `plot_usage(histogram, path)` draws the dataset's code frequencies when given (the library draws nothing)."""
    data, out = Path(data), Path(out)
    splits = {name: ShardSplit(data, name) for name in read_manifest(data)["splits"]}
    first = next(iter(splits.values()))
    if first.manifest.get("kind") != "images":
        raise RunError(f"{data}: holds {first.manifest.get('kind')} shards, not images")
    size = first.item_shape[0]
    if size != vqgan.config.image_size:
        raise RunError(f"{data}: images are {size}x{size} but the VQGAN {vqgan.path} takes "
                       f"{vqgan.config.image_size}x{vqgan.config.image_size}; re-shard with --size {vqgan.config.image_size}")
    if crops and not first.crop_room:
        raise RunError(f"{data}: images are stored at their size {size}, so every crop is the whole image; "
                       f"re-shard with --stored-size above --size (e.g. {size + size // 8}) or drop --crops")
    bound = binding(vqgan, data)
    jobs = plan_jobs(splits, flip, crops)
    if dist.is_main:
        check_destination(out, bound, flip, jobs, crops)
        (out / RECEIPTS_DIR).mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
    distributed.barrier()

    mine = jobs[dist.rank::dist.world_size]
    total_images = sum(splits[j.split].shards[j.shard_index].count for j in mine)
    skipped = 0
    verified: set[tuple[str, int]] = set()   # a flipped job reads the shard its plain job has checked
    with progress_bar(progress, total=total_images, desc=f"quantize rank {dist.rank}", unit="img",
                      enabled=dist.is_main) as bar:
        for job in mine:
            source = splits[job.split].shards[job.shard_index]
            if receipt_matches(out, job, source.sha256, bound, source.count) is not None:
                skipped += 1
                bar.update(source.count)
                continue
            if (job.split, job.shard_index) not in verified:   # read whole anyway: bytes changed under the manifest stop here
                splits[job.split].verify_shard(job.shard_index)
                verified.add((job.split, job.shard_index))
            items, labels = splits[job.split].shard_arrays(job.shard_index)
            tokens = encode_shard(vqgan, items, batch_size, job.flipped, dist.device, dtype, encoder,
                                  crop_corners(splits[job.split], job.shard_index, job.crop))
            record = ShardWriter.write_shard(out, job.out_name[:-len(".npy")], tokens, labels)
            # trusted by the reader in place of a scan: the GPT trainer checks these bytes' sha256 when it opens them
            record["token_range"] = [int(tokens.min()), int(tokens.max())]
            atomic_write_json(out / RECEIPTS_DIR / (job.out_name + ".json"),
                              {**record, **bound, "source_file": source.items_path.name,
                               "source_sha256": source.sha256, "flipped": job.flipped, "crop": job.crop,
                               "split": job.split})
            bar.update(source.count)
    if skipped and dist.is_main:
        print(f"quantize: {skipped} finished token shard(s) on rank 0 already matched their source; skipped")
    distributed.barrier()
    if not dist.is_main:
        return None
    return write_token_manifest(vqgan, data, out, splits, jobs, bound, flip, plot_usage, crops)


def write_token_manifest(vqgan: LoadedVQGAN, data: Path, out: Path, splits: dict[str, ShardSplit],
                         jobs: list[Job], bound: dict, flip: bool,
                         plot_usage: Callable[[np.ndarray, Path], None] | None = None, crops: int = 0) -> dict:
    codebook_size = vqgan.config.codebook_size
    histogram = np.zeros(codebook_size, dtype=np.int64)
    records: dict[str, list[dict]] = {name: [] for name in splits}
    for job in jobs:
        receipt = read_receipt(out / RECEIPTS_DIR / (job.out_name + ".json"))
        if receipt is None:
            raise RunError(f"{out / RECEIPTS_DIR / (job.out_name + '.json')}: changed while quantizing; rerun")
        record = {k: receipt[k] for k in ("file", "count", "sha256", "labels_file", "labels_sha256", "token_range")
                  if k in receipt}
        record["flipped"] = job.flipped
        if job.crop:
            record["crop"] = job.crop
        records[job.split].append(record)
        if not job.flipped and not job.crop:   # the dataset's usage: each image once
            tokens = np.load(out / job.out_name, mmap_mode="r")
            histogram += np.bincount(np.asarray(tokens, dtype=np.int64).ravel(), minlength=codebook_size)
    save_npy_atomic(out / HISTOGRAM_NAME, histogram)
    usage = {**codebook_usage(torch.from_numpy(histogram)), "histogram_file": HISTOGRAM_NAME}
    if plot_usage is not None:
        plot_usage(histogram, out / USAGE_PLOT_NAME)
        usage["plot_file"] = USAGE_PLOT_NAME
    h, w = vqgan.model.latent_grid
    first = next(iter(splits.values()))
    manifest = build_manifest(
        "tokens", (h * w,), token_dtype(codebook_size), records, first.classes,
        codebook_size=codebook_size, latent_grid=[h, w], image_size=vqgan.config.image_size,
        flip=flip, crops=crops, vqgan_checkpoint=str(vqgan.path.resolve()), vqgan_step=vqgan.step,
        vqgan_config=asdict(vqgan.config), source_shards=str(data.resolve()), **bound,
        usage=usage)
    write_manifest(out, manifest)
    return manifest

