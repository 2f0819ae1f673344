"""FID and Inception Score through torch-fidelity, offline, over shards, image folders, .npz batches and samples.

torch-fidelity supplies the network (the TF-compatible InceptionV3 behind published FIDs), the
Frechet distance and the Inception Score; this module feeds it uint8 images straight from the
shards, splits batches over ranks with results independent of the world size, and caches
reference statistics beside the reference shards. Nothing is downloaded, and torch-fidelity only
unpickles bytes that `torch.load(weights_only=True)` has already accepted.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from models.perceptual import find_weights_file, hub_checkpoint_dir
from vqgpt import distributed
from vqgpt.errors import RunError
from vqgpt.files import atomic_path, sha256_file
from vqgpt.images import IMAGE_SUFFIXES, to_uint8
from vqgpt.runlog import progress as progress_bar
from vqgpt.sampling import sample_tokens
from vqgpt.shards import MANIFEST_NAME, ShardError, ShardSplit
from vqgpt.training import autocast, strict_fp32

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         + INCEPTION_WEIGHTS_FILE)
POOL_FEATURES, LOGITS = "2048", "logits_unbiased"   # torch-fidelity's layers for FID and for IS
FEATURE_DIM = 2048

Images = np.ndarray | list   # uint8 (B, H, W, 3), or a list of (H, W, 3) arrays of different sizes


class InceptionWeightsError(RunError):
    """The Inception weights are missing or are not torch-fidelity's InceptionV3 state dict."""


def missing_weights_message() -> str:
    return (f"FID needs torch-fidelity's Inception weights {INCEPTION_WEIGHTS_FILE}, not found in "
            f"{hub_checkpoint_dir()}/; copy the file there ({INCEPTION_WEIGHTS_URL}) or pass --inception-weights PATH")


def find_inception_weights(user_path: str = "") -> Path:
    """The user's file (which must exist), else the torch hub cache's copy; never the internet."""
    path = find_weights_file(user_path, INCEPTION_WEIGHTS_FILE)
    if path is None:
        given = f"--inception-weights {user_path}: no such file; " if user_path else ""
        raise InceptionWeightsError(given + missing_weights_message())
    return path


@dataclass
class Features:
    pool: np.ndarray     # float32 (N, 2048): FID
    logits: np.ndarray   # float32 (N, 1008): Inception Score

    def __len__(self) -> int:
        return len(self.pool)


class Inception:
    """torch-fidelity's InceptionV3 loaded from a checked file; uint8 images of any size in, features out."""

    def __init__(self, network: torch.nn.Module, path: Path, sha256: str, device: torch.device):
        self.network = network
        self.path = path
        self.sha256 = sha256
        self.device = device

    @torch.no_grad()
    def features(self, images: Images) -> Features:
        """Images of one size go in as one batch; torch-fidelity resizes them to 299 inside the network."""
        runs: list[list[np.ndarray]] = []
        for image in images:   # consecutive images of the same size form one forward
            if runs and runs[-1][0].shape == image.shape:
                runs[-1].append(image)
            else:
                runs.append([image])
        pool, logits = [], []
        for run in runs:
            batch = torch.from_numpy(np.ascontiguousarray(np.stack(run))).to(self.device).permute(0, 3, 1, 2)
            with strict_fp32(), torch.autocast(self.device.type, enabled=False):   # the published protocol: fp32
                run_pool, run_logits = self.network(batch)
            pool.append(run_pool.float().cpu().numpy())
            logits.append(run_logits.float().cpu().numpy())
        return Features(np.concatenate(pool), np.concatenate(logits))


def load_inception(user_path: str = "", device: torch.device | str = "cpu") -> Inception:
    """Find, check and load the Inception weights; one clear InceptionWeightsError for any bad file."""
    path = find_inception_weights(user_path)
    data = path.read_bytes()
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:   # not a torch file, truncated, or a pickle that would run code
        raise InceptionWeightsError(f"{path}: refused, torch.load(weights_only=True) cannot read it "
                                    f"({type(err).__name__}); it is not a plain state dict (a pickle may run code). "
                                    f"{missing_weights_message()}") from None
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise InceptionWeightsError(f"{path}: holds no state dict of tensors; is it {INCEPTION_WEIGHTS_FILE}?")
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:
        # torch-fidelity unpickles with weights_only=False: hand it the very bytes checked above
        network = FeatureExtractorInceptionV3("inception-v3-compat", [POOL_FEATURES, LOGITS],
                                              feature_extractor_weights_path=io.BytesIO(data))
    except RuntimeError as err:   # strict load_state_dict: missing, unexpected or misshapen tensors
        detail = " ".join(str(err).split())[:300]
        raise InceptionWeightsError(f"{path}: is not torch-fidelity's InceptionV3 state dict ({detail})") from None
    network.to(device).eval().requires_grad_(False)
    return Inception(network, path, hashlib.sha256(data).hexdigest(), torch.device(device))


def fid_statistics(pool: np.ndarray) -> dict[str, np.ndarray]:
    """Mean and covariance of (N, 2048) features, float64 (torch-fidelity's estimator)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    stats = fid_features_to_statistics(torch.from_numpy(np.ascontiguousarray(pool)))
    return {"mu": stats["mu"].astype(np.float64), "sigma": stats["sigma"].astype(np.float64)}


def frechet_distance(stats_a: dict, stats_b: dict) -> float:
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    return float(fid_statistics_to_metric(stats_a, stats_b, verbose=False)[KEY_METRIC_FID])


def inception_score(logits: np.ndarray, splits: int = 10) -> dict[str, float]:
    """torch-fidelity's IS (10 splits of a fixed shuffle; fewer splits for fewer than 10 images)."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    result = isc_features_to_metric(torch.from_numpy(np.ascontiguousarray(logits)), splits=min(splits, len(logits)))
    return {"isc_mean": result[KEY_METRIC_ISC_MEAN], "isc_std": result[KEY_METRIC_ISC_STD]}


def extract_features(count: int, batch_size: int, make_batch: Callable[[int, int], Images], inception: Inception,
                     *, rank: int = 0, world_size: int = 1, progress: str | bool = False, desc: str = "inception"
                     ) -> Features | None:
    """Features of items [0, count) made by `make_batch(start, stop)`: batch k runs on rank k % world_size.

    Every batch has the same content and size whatever the world size, so rank 0 gathers exactly
    the features one process computes. Other ranks return None.
    """
    starts = range(rank * batch_size, count, world_size * batch_size)
    mine = {}
    with progress_bar(progress, total=sum(min(batch_size, count - s) for s in starts), desc=desc, unit="img",
                      enabled=rank == 0) as bar:
        for start in starts:
            stop = min(start + batch_size, count)
            mine[start] = inception.features(make_batch(start, stop))
            bar.update(stop - start)
    gathered = distributed.gather_to_main(mine) if world_size > 1 else [mine]
    if gathered is None:
        return None
    batches = {start: part for parts in gathered for start, part in parts.items()}
    ordered = [batches[start] for start in sorted(batches)]
    return Features(np.concatenate([b.pool for b in ordered]), np.concatenate([b.logits for b in ordered]))


class ImageSource:
    """Images to score: a split of an image shard folder, an image folder, or the arr_0 of a .npz."""

    def __init__(self, description: str, count: int, read: Callable[[int, int], Images],
                 shards: ShardSplit | None = None):
        self.description = description
        self.count = count
        self.read = read
        self.shards = shards

    @staticmethod
    def from_shards(split: ShardSplit) -> "ImageSource":
        if split.manifest.get("kind") != "images" or len(split.item_shape) != 3 or split.item_shape[2] != 3:
            raise ShardError(f"{split.root}: holds {split.manifest.get('kind')} shards {split.item_shape}, "
                             "not RGB image shards")
        if len(split) == 0:
            raise ShardError(f"{split.root}: split {split.split!r} is empty")
        return ImageSource(f"{split.root} ({split.split})", len(split),
                           lambda start, stop: split.read(np.arange(start, stop))[0], split)

    @staticmethod
    def from_folder(root: Path) -> "ImageSource":
        from PIL import Image

        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise RunError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")

        def read(start: int, stop: int) -> list:
            images = []
            for path in files[start:stop]:
                try:
                    with Image.open(path) as image:
                        images.append(np.asarray(image.convert("RGB")))   # what torch-fidelity's folder reader does
                except (OSError, ValueError) as err:
                    raise RunError(f"{path}: cannot be read as an image ({err})") from None
            return images
        return ImageSource(str(root), len(files), read)

    @staticmethod
    def from_array(path: Path, array: np.ndarray) -> "ImageSource":
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[3] != 3 or len(array) == 0:
            raise RunError(f"{path}: arr_0 is {array.dtype}{list(array.shape)}, expected uint8 (N, H, W, 3) images")
        return ImageSource(str(path), len(array), lambda start, stop: array[start:stop])


def _load_npz(path: Path) -> np.lib.npyio.NpzFile:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise RunError(f"{path}: not a readable .npz ({err})") from None


def open_images(path: str, split: str) -> ImageSource:
    """An image shard folder (its `split`), an image folder, or a .npz whose arr_0 holds images."""
    where = Path(path)
    if where.is_dir() and (where / MANIFEST_NAME).is_file():
        return ImageSource.from_shards(ShardSplit(where, split))
    if where.is_dir():
        return ImageSource.from_folder(where)
    if where.is_file() and where.suffix == ".npz":
        arrays = _load_npz(where)
        if "arr_0" not in arrays.files:
            raise RunError(f"{where}: has no arr_0 images (only {arrays.files}); it can only be a --ref")
        return ImageSource.from_array(where, arrays["arr_0"])
    raise RunError(f"{where}: not an image folder, an image shard folder or a .npz file")


def cache_path(split: ShardSplit, weights_sha256: str) -> Path:
    return split.root / f"fid_stats_{split.split}_{weights_sha256[:16]}.npz"


def _read_cache(path: Path, split: ShardSplit, weights_sha256: str) -> dict | None:
    """Cached statistics if they were made from these shards (same manifest) with these weights."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as cached:
            if (str(cached["weights_sha256"]) != weights_sha256 or int(cached["count"]) != len(split)
                    or str(cached["manifest_sha256"]) != sha256_file(split.root / MANIFEST_NAME)):
                return None
            return {"mu": cached["mu"], "sigma": cached["sigma"]}
    except (OSError, ValueError, KeyError):   # torn or foreign file: recompute and overwrite
        return None


def _write_cache(path: Path, stats: dict, split: ShardSplit, weights_sha256: str) -> bool:
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, mu=stats["mu"], sigma=stats["sigma"], count=len(split),
                         weights_sha256=weights_sha256, manifest_sha256=sha256_file(split.root / MANIFEST_NAME))
        return True
    except OSError as err:   # a read-only reference folder: evaluate anyway, without a cache
        print(f"{path}: statistics not cached ({err})", flush=True)
        return False


@dataclass
class Reference:
    stats: dict | None   # mu/sigma on rank 0 (None elsewhere)
    info: dict           # what the JSON result says about the reference


def reference_statistics(path: str, split: str, inception: Inception, batch_size: int, *, rank: int = 0,
                         world_size: int = 1, use_cache: bool = True, progress: str | bool = False) -> Reference:
    """FID statistics of a reference: ADM-style .npz `mu`/`sigma` as given, shards through the cache, else extracted."""
    where = Path(path)
    if where.is_file() and where.suffix == ".npz":
        arrays = _load_npz(where)
        if "mu" in arrays.files and "sigma" in arrays.files:
            stats = {"mu": arrays["mu"].astype(np.float64), "sigma": arrays["sigma"].astype(np.float64)}
            if stats["mu"].shape != (FEATURE_DIM,) or stats["sigma"].shape != (FEATURE_DIM, FEATURE_DIM):
                raise RunError(f"{where}: mu {stats['mu'].shape} / sigma {stats['sigma'].shape} are not "
                               f"({FEATURE_DIM},) / ({FEATURE_DIM}, {FEATURE_DIM}) Inception pool statistics")
            if not (np.isfinite(stats["mu"]).all() and np.isfinite(stats["sigma"]).all()):   # FID would be NaN
                raise RunError(f"{where}: mu / sigma hold NaN or infinite values; not a usable reference")
            return Reference(stats, {"ref": str(where), "ref_images": None, "ref_statistics": "npz mu/sigma"})
    source = open_images(path, split)
    info = {"ref": source.description, "ref_images": source.count}
    if source.shards is not None:
        info["ref_split"] = split
    cache = cache_path(source.shards, inception.sha256) if source.shards is not None and use_cache else None
    cached = _read_cache(cache, source.shards, inception.sha256) if cache is not None and rank == 0 else None
    hit = distributed.broadcast_object(cached is not None) if world_size > 1 else cached is not None
    if hit:   # one decision for every rank
        return Reference(cached, {**info, "ref_statistics": f"cached {cache.name}"})
    features = extract_features(source.count, batch_size, source.read, inception, rank=rank, world_size=world_size,
                                progress=progress, desc="reference")
    if features is None:
        return Reference(None, info)
    stats = fid_statistics(features.pool)
    written = cache is not None and _write_cache(cache, stats, source.shards, inception.sha256)
    return Reference(stats, {**info, "ref_statistics": f"extracted, cached in {cache.name}" if written else "extracted"})


def balanced_labels(count: int, n_classes: int) -> np.ndarray | None:
    """Class i for every sample i % n_classes: each class count / n_classes times (None: unconditional)."""
    return np.arange(count) % n_classes if n_classes else None


def batch_seed(seed: int, start: int) -> int:
    """Seed of the batch starting at sample `start`: the same on whichever rank draws it."""
    return int(np.random.SeedSequence([seed, start]).generate_state(1)[0])


@torch.no_grad()
def generate_images(gpt: torch.nn.Module, vqgan: torch.nn.Module, labels: np.ndarray | None, start: int, stop: int,
                    *, seed: int, dtype: torch.dtype = torch.float32, **sampling) -> np.ndarray:
    """Samples [start, stop) of a seeded run, decoded by the VQGAN: uint8 (stop - start, H, W, 3)."""
    device = next(gpt.parameters()).device
    generator = torch.Generator(device=device).manual_seed(batch_seed(seed, start))
    batch_labels = None if labels is None else torch.from_numpy(labels[start:stop]).to(device)
    with autocast(device, dtype):
        tokens = sample_tokens(gpt, stop - start, labels=batch_labels, generator=generator, **sampling)
        images = vqgan.decode_indices(tokens)
    return to_uint8(images)


def sample_fid(gpt: torch.nn.Module, vqgan: torch.nn.Module, count: int, reference_stats: dict, inception: Inception,
               *, seed: int, batch_size: int, dtype: torch.dtype = torch.float32, **sampling) -> dict:
    """gFID and IS of `count` class-balanced samples on one process (the trainers' small gFID)."""
    labels = balanced_labels(count, gpt.config.n_classes)
    features = extract_features(count, batch_size, lambda start, stop: generate_images(
        gpt, vqgan, labels, start, stop, seed=seed, dtype=dtype, **sampling), inception)
    return {"gfid": frechet_distance(fid_statistics(features.pool), reference_stats), **inception_score(features.logits)}


def save_random_inception(path: str | Path, seed: int = 0, calibration_batches: int = 3, batch_size: int = 8) -> Path:
    """A random InceptionV3 in torch-fidelity's layout, for tests and benchmarks offline (same cost, meaningless FIDs).

    With BatchNorm's default statistics the random features collapse to a point and every FID is
    about 0, so the statistics are first calibrated on a few batches of random images.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):   # keep the random initialisation
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        network = Skeleton("inception-v3-compat", [POOL_FEATURES], feature_extractor_weights_path=empty)
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None   # a plain average over the calibration batches
        network.train()
        with torch.no_grad():
            for _ in range(calibration_batches):
                network(torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8))
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(network.state_dict(), tmp)
    return path
