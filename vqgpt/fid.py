"""FID, sFID, precision / recall and Inception Score through torch-fidelity, offline, over shards, image folders,
.npz batches and samples.

torch-fidelity supplies the network (the TF-compatible InceptionV3 behind published FIDs), the
Frechet distance, precision / recall and the Inception Score, on the features ADM's evaluator
uses (pool features; the first 7 channels of mixed_6/conv for sFID); this module feeds it uint8 images straight from the
shards, splits batches over ranks with results independent of the world size, and caches
reference statistics beside the reference shards. Nothing is downloaded, and torch-fidelity only
unpickles bytes that `torch.load(weights_only=True)` has already accepted.
"""
from __future__ import annotations

import hashlib
import io
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from models.perceptual import find_weights_file, hub_checkpoint_dir
from vqgpt import distributed
from vqgpt.errors import RunError
from vqgpt.files import atomic_path, sha256_file
from vqgpt.images import IMAGE_SUFFIXES, SkipImage, decode_image, to_uint8
from vqgpt.runlog import progress as progress_bar
from vqgpt.sampling import sample_tokens
from vqgpt.shards import MANIFEST_NAME, ShardError, ShardSplit, read_manifest
from vqgpt.training import autocast, strict_fp32

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         + INCEPTION_WEIGHTS_FILE)
POOL_FEATURES, LOGITS = "2048", "logits_unbiased"   # torch-fidelity's layers for FID and for IS
FEATURE_DIM = 2048
# sFID as ADM's evaluator takes it: TF's mixed_6/conv is Mixed_6d's 1x1 branch (after its ReLU), 17 x 17 at 299 px;
# its first 7 channels, flattened in TF's (H, W, C) order
SPATIAL_LAYER, SPATIAL_CHANNELS = "Mixed_6d.branch1x1", 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS
PRC_NEIGHBOURHOOD = 3   # Kynkaanniemi et al. 2019 and ADM's evaluator
# ADM's reference batches hold 10,000 images for precision / recall; the k-NN radii cost N_ref^2 distances, so a
# larger reference (a train split) is subsampled to this many, the same ones every time
PRC_MAX_REFERENCE = 10_000

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
    pool: np.ndarray      # float32 (N, 2048): FID, precision and recall
    spatial: np.ndarray   # float32 (N, 2023): sFID
    logits: np.ndarray    # float32 (N, 1008): Inception Score

    def __len__(self) -> int:
        return len(self.pool)


class Inception:
    """torch-fidelity's InceptionV3 loaded from a checked file; uint8 images of any size in, features out."""

    def __init__(self, network: torch.nn.Module, path: Path, sha256: str, device: torch.device):
        self.network = network
        self.path = path
        self.sha256 = sha256
        self.device = device
        self._spatial: list[torch.Tensor] = []   # filled by the hook during each forward
        network.get_submodule(SPATIAL_LAYER).register_forward_hook(
            lambda module, inputs, output: self._spatial.append(output))

    @torch.no_grad()
    def features(self, images: Images) -> Features:
        """Images of one size go in as one batch; torch-fidelity resizes them to 299 inside the network."""
        runs: list[list[np.ndarray]] = []
        for image in images:   # consecutive images of the same size form one forward
            if runs and runs[-1][0].shape == image.shape:
                runs[-1].append(image)
            else:
                runs.append([image])
        pool, spatial, logits = [], [], []
        for run in runs:
            batch = torch.from_numpy(np.ascontiguousarray(np.stack(run))).to(self.device).permute(0, 3, 1, 2)
            self._spatial.clear()
            with strict_fp32(), torch.autocast(self.device.type, enabled=False):   # the published protocol: fp32
                run_pool, run_logits = self.network(batch)
            pool.append(run_pool.float().cpu().numpy())
            mixed_6 = self._spatial[0][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)
            spatial.append(mixed_6.reshape(len(run), -1).float().cpu().numpy())
            logits.append(run_logits.float().cpu().numpy())
        return Features(np.concatenate(pool), np.concatenate(spatial), np.concatenate(logits))


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


def fid_statistics(features: np.ndarray) -> dict[str, np.ndarray]:
    """Mean and covariance of (N, D) features, float64 (torch-fidelity's estimator): pool for FID, spatial for sFID."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    stats = fid_features_to_statistics(torch.from_numpy(np.ascontiguousarray(features)))
    return {"mu": stats["mu"].astype(np.float64), "sigma": stats["sigma"].astype(np.float64)}


def frechet_distance(stats_a: dict, stats_b: dict) -> float:
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    return float(fid_statistics_to_metric(stats_a, stats_b, verbose=False)[KEY_METRIC_FID])


def precision_recall(samples: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Kynkaanniemi et al.'s precision and recall (k = 3) of sample features against reference features.

    torch-fidelity's estimator on Inception pool features, as ADM's evaluator computes them:
    precision is the share of samples inside some reference image's k-NN ball, recall the reverse.
    Each set needs more than k images; with fewer the two are left out. A reference of more than
    PRC_MAX_REFERENCE images is subsampled to that many (seeded), as ADM's 10,000-image batches are.
    """
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    if min(len(samples), len(reference)) <= PRC_NEIGHBOURHOOD:
        return {}
    if len(reference) > PRC_MAX_REFERENCE:
        keep = np.sort(np.random.default_rng(0).choice(len(reference), PRC_MAX_REFERENCE, replace=False))
        reference = reference[keep]
    result = prc_features_to_metric(torch.from_numpy(np.ascontiguousarray(samples)),
                                    torch.from_numpy(np.ascontiguousarray(reference)),
                                    prc_neighborhood=PRC_NEIGHBOURHOOD, prc_batch_size=10000, save_cpu_ram=True,
                                    verbose=False)
    return {"precision": result[KEY_METRIC_PRECISION], "recall": result[KEY_METRIC_RECALL],
            "prc_reference_images": len(reference)}


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
    return Features(*(np.concatenate([getattr(b, name) for b in ordered]) for name in ("pool", "spatial", "logits")))


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
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise RunError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")

        def read(start: int, stop: int) -> list:
            images = []
            for path in files[start:stop]:
                try:   # convert("RGB"): what torch-fidelity's folder reader does
                    images.append(np.asarray(decode_image(path, lambda image: image.convert("RGB"))))
                except SkipImage as err:   # shardify's rule (decompression bombs included); a score needs them all
                    raise RunError(f"{path}: cannot be scored ({err}); remove it from the folder") from None
            return images
        return ImageSource(str(root), len(files), read)

    @staticmethod
    def from_array(path: Path, array: np.ndarray) -> "ImageSource":
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[3] != 3 or len(array) == 0:
            raise RunError(f"{path}: arr_0 is {array.dtype}{list(array.shape)}, expected uint8 (N, H, W, 3) images")
        return ImageSource(str(path), len(array), lambda start, stop: array[start:stop])


def read_npz(path: Path, keys: tuple[str, ...]) -> tuple[list[str], dict[str, np.ndarray]]:
    """The names in a .npz and those of `keys` it has, read without pickles; anything malformed is one RunError."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise RunError(f"{path}: holds one .npy array, not a .npz archive of arr_0 images or mu/sigma")
        with loaded:
            return list(loaded.files), {key: loaded[key] for key in keys if key in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:   # object arrays: ValueError
        raise RunError(f"{path}: not a readable .npz ({type(err).__name__}: {' '.join(str(err).split())[:200]}); "
                       "object arrays and pickles are refused") from None


def checked_statistics(path: Path, files: list[str], arrays: dict, names: tuple[str, str], dim: int) -> dict:
    """mu / sigma of a .npz as float64, refused unless both are there, numeric, (dim,) / (dim, dim) and finite."""
    mu_name, sigma_name = names
    missing = [name for name in names if name not in files]
    if missing:
        raise RunError(f"{path}: has no {' and no '.join(missing)}; statistics need both {mu_name} and {sigma_name}")
    mu, sigma = arrays[mu_name], arrays[sigma_name]
    if mu.dtype.kind not in "fiu" or sigma.dtype.kind not in "fiu" or mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise RunError(f"{path}: {mu_name} {mu.dtype}{list(mu.shape)} / {sigma_name} {sigma.dtype}{list(sigma.shape)} "
                       f"are not ({dim},) / ({dim}, {dim}) real Inception statistics")
    stats = {"mu": mu.astype(np.float64), "sigma": sigma.astype(np.float64)}
    if not (np.isfinite(stats["mu"]).all() and np.isfinite(stats["sigma"]).all()):   # FID would be NaN
        raise RunError(f"{path}: {mu_name} / {sigma_name} hold NaN or infinite values; not a usable reference")
    return stats


def open_images(path: str, split: str) -> ImageSource:
    """An image shard folder (its `split`), an image folder, or a .npz whose arr_0 holds images."""
    where = Path(path)
    if where.is_dir() and (where / MANIFEST_NAME).is_file():
        return ImageSource.from_shards(ShardSplit(where, split))
    if where.is_dir():
        return ImageSource.from_folder(where)
    if where.is_file() and where.suffix == ".npz":
        files, arrays = read_npz(where, ("arr_0",))
        if "arr_0" not in files:
            raise RunError(f"{where}: has no arr_0 images (only {files})")
        return ImageSource.from_array(where, arrays["arr_0"])
    raise RunError(f"{where}: not an image folder, an image shard folder or a .npz file")


def check_reference_path(path: str, flag: str = "--fid-ref") -> None:
    """Refused at start, not at the first eval hours later."""
    where = Path(path)
    if not (where.is_dir() or (where.is_file() and where.suffix == ".npz")):
        raise RunError(f"{flag} {path}: not an image shard folder, an image folder or a .npz file")


def token_source_shards(manifest: dict, tokens: str) -> str:
    """The image shards a token manifest names, taken only as quantize.py writes them.

    A manifest is untrusted (shards.py's rule): the path must be absolute with no link or `..` in it and hold
    image shards, else --eval-fid would read and score whatever folder it names.
    """
    named = manifest.get("source_shards", "")
    fix = "pass --fid-ref with the train images' shards (or an image folder or ADM .npz)"
    plain = os.path.isabs(named) and ".." not in Path(named).parts and os.path.realpath(named) == os.path.normpath(named)
    if not plain:
        raise RunError(f"{tokens}: source_shards {named!r} is not the absolute, link-free path quantize.py writes; {fix}")
    try:
        kind = read_manifest(named).get("kind")
    except (ShardError, OSError):
        kind = None
    if kind != "images":
        raise RunError(f"{tokens}: source_shards {named} holds no image shards (moved?); {fix}")
    return named


def cache_path(split: ShardSplit, weights_sha256: str) -> Path:
    return split.root / f"fid_stats_{split.split}_{weights_sha256[:16]}.npz"


def _read_cache(path: Path, split: ShardSplit, weights_sha256: str, with_features: bool) -> dict | None:
    """Cached statistics (and pool features if asked) made from these shards (same manifest) with these weights."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as cached:
            if (str(cached["weights_sha256"]) != weights_sha256 or int(cached["count"]) != len(split)
                    or str(cached["manifest_sha256"]) != sha256_file(split.root / MANIFEST_NAME)
                    or "mu_s" not in cached.files or (with_features and "pool" not in cached.files)):
                return None
            wanted = ("mu", "sigma", "mu_s", "sigma_s") + (("pool",) if with_features else ())   # pool: 8 KB an image
            return {name: cached[name] for name in wanted if name in cached.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error):   # torn, foreign or older
        return None   # (a cache without sFID's mu_s): recompute and overwrite


def _write_cache(path: Path, arrays: dict, split: ShardSplit, weights_sha256: str) -> bool:
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, **arrays, count=len(split), weights_sha256=weights_sha256,
                         manifest_sha256=sha256_file(split.root / MANIFEST_NAME))
        return True
    except OSError as err:   # a read-only reference folder: evaluate anyway, without a cache
        print(f"{path}: statistics not cached ({err})", flush=True)
        return False


@dataclass
class Reference:
    stats: dict | None   # pool mu/sigma on rank 0 (None elsewhere)
    info: dict           # what the JSON result says about the reference
    spatial_stats: dict | None = None   # sFID's mu/sigma, where the reference gives them
    pool: np.ndarray | None = None      # pool features for precision / recall, where asked for and there are images

    def scores(self, features: Features) -> dict:
        """FID, then sFID and precision / recall where this reference gives them, and IS of the samples' features."""
        result = {"fid": frechet_distance(fid_statistics(features.pool), self.stats)}
        if self.spatial_stats is not None:
            result["sfid"] = frechet_distance(fid_statistics(features.spatial), self.spatial_stats)
        if self.pool is not None:
            result.update(precision_recall(features.pool, self.pool))
        return {**result, **inception_score(features.logits)}


def reference_statistics(path: str, split: str, inception: Inception, batch_size: int, *, rank: int = 0,
                         world_size: int = 1, use_cache: bool = True, progress: str | bool = False,
                         keep_features: bool = False) -> Reference:
    """Statistics of a reference: an ADM-style .npz's `mu`/`sigma` (and `mu_s`/`sigma_s`) as given, shards through
    the cache, else extracted over all ranks. `keep_features`: also its pool features, for precision / recall
    (of an ADM .npz, from its arr_0 images, as ADM's evaluator does)."""
    where = Path(path)
    if where.is_file() and where.suffix == ".npz":
        files, arrays = read_npz(where, ("mu", "sigma", "mu_s", "sigma_s"))
        if "mu" in files or "sigma" in files:
            stats = checked_statistics(where, files, arrays, ("mu", "sigma"), FEATURE_DIM)
            spatial = (checked_statistics(where, files, arrays, ("mu_s", "sigma_s"), SPATIAL_DIM)
                       if "mu_s" in files or "sigma_s" in files else None)
            info = {"ref": str(where), "ref_images": None, "ref_statistics": "npz mu/sigma"}
            if not (keep_features and "arr_0" in files):
                return Reference(stats, info, spatial)
            source = open_images(path, split)
            features = extract_features(source.count, batch_size, source.read, inception, rank=rank,
                                        world_size=world_size, progress=progress, desc="reference")
            if features is None:
                return Reference(None, info)
            return Reference(stats, {**info, "ref_images": source.count},
                             spatial if spatial is not None else fid_statistics(features.spatial), features.pool)
        if "arr_0" not in files:
            raise RunError(f"{where}: holds neither mu/sigma statistics nor arr_0 images (only {files})")
    source = open_images(path, split)
    info = {"ref": source.description, "ref_images": source.count}
    if source.shards is not None:
        info["ref_split"] = split
    cache = cache_path(source.shards, inception.sha256) if source.shards is not None and use_cache else None
    cached = (_read_cache(cache, source.shards, inception.sha256, keep_features)
              if cache is not None and rank == 0 else None)
    hit = distributed.broadcast_object(cached is not None) if world_size > 1 else cached is not None
    if hit:   # one decision for every rank
        if cached is None:   # the other ranks
            return Reference(None, info)
        spatial = {"mu": cached["mu_s"], "sigma": cached["sigma_s"]}
        return Reference({"mu": cached["mu"], "sigma": cached["sigma"]},
                         {**info, "ref_statistics": f"cached {cache.name}"}, spatial, cached.get("pool"))
    # every rank extracts its share of the batches (rank 0 gathers them), whatever the size of the split
    features = extract_features(source.count, batch_size, source.read, inception, rank=rank, world_size=world_size,
                                progress=progress, desc="reference")
    if features is None:
        return Reference(None, info)
    stats, spatial = fid_statistics(features.pool), fid_statistics(features.spatial)
    pool = features.pool if keep_features else None
    arrays = {**stats, "mu_s": spatial["mu"], "sigma_s": spatial["sigma"], **({"pool": pool} if keep_features else {})}
    written = cache is not None and _write_cache(cache, arrays, source.shards, inception.sha256)
    return Reference(stats, {**info, "ref_statistics": f"extracted, cached in {cache.name}" if written else "extracted"},
                     spatial, pool)


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
