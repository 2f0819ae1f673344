"""Decoding any image file into a square uint8 RGB array, and the reverse for figures."""
from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps

from vqgpt.files import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
RESIZE_METHODS = ("lanczos", "adm")


class SkipImage(Exception):
    """This file cannot become a training image; the message is the reason recorded in the manifest."""


def png_significant_bits(path: str | os.PathLike) -> int | None:
    """A PNG's sBIT chunk (grey bits; 12 for a 12-bit scan stored in 16-bit samples), which Pillow does not read."""
    with open(path, "rb") as handle:
        if handle.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        while len(head := handle.read(8)) == 8:
            length, kind = struct.unpack(">I4s", head)
            if kind == b"sBIT":
                data = handle.read(length)
                return data[0] if data and 1 <= data[0] <= 16 else None
            if kind in (b"IDAT", b"IEND"):   # sBIT must come before the image data
                return None
            handle.seek(length + 4, os.SEEK_CUR)   # data and CRC
    return None


def to_rgb(image: Image.Image, significant_bits: int | None = None) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited over white. significant_bits: of 16-bit grey samples."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit grayscale: scale to 8 bits instead of letting Pillow clip at 255
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if image.mode == "F" and values.size and values.min() >= 0 and values.max() <= 1:
            peak = 1.0   # float images in [0, 1] (the usual convention), not 0..255 values that would come out black
        elif significant_bits:
            peak = 2.0 ** significant_bits - 1   # 12-bit values over 65535 would come out a sixteenth as bright
        else:
            peak = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(values * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")


def decode_image(path: str | os.PathLike, prepare: Callable[[Image.Image], Image.Image]) -> Image.Image:
    """The first frame of an image file, opened and turned into what the caller needs by `prepare`.

    Raises SkipImage with a short reason for anything unusable: empty, unreadable, or a
    decompression bomb (more than Pillow's MAX_IMAGE_PIXELS: its warning is treated as the error).
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise SkipImage("empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.seek(0)  # first frame of animations
                return prepare(image)
    except SkipImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise SkipImage(f"decompression bomb: {err}") from None
    except Image.UnidentifiedImageError:
        raise SkipImage("not a recognised image") from None
    except MemoryError:
        raise SkipImage("too large to decode in memory") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise SkipImage(f"unreadable: {err}") from None
    except Exception as err:   # Pillow's parsers also raise struct.error, KeyError, IndexError, ...
        raise SkipImage(f"unreadable: {type(err).__name__}: {err}") from None


def load_square_image(path: str | os.PathLike, size: int, resize: str = "lanczos") -> np.ndarray:
    """RGB, its centre square at `size`: uint8 (size, size, 3).

    resize "lanczos": EXIF-oriented, the centre square resized with Lanczos. "adm": as ADM's and LlamaGen's
    loaders make it (no EXIF rotation, no JPEG draft decoding, `adm_center_crop`), so FID statistics match theirs.
    Raises SkipImage with a short reason for anything unusable.
    """
    adm = resize == "adm"

    def prepare(image: Image.Image) -> Image.Image:
        if image.format == "JPEG" and not adm:
            image.draft("RGB", (size, size))  # decoder-side downscale, still >= size on both sides
        image.load()
        bits = png_significant_bits(path) if image.format == "PNG" and image.mode.startswith("I") else None
        return to_rgb(image if adm else ImageOps.exif_transpose(image), bits)

    image = decode_image(path, prepare)
    if adm:
        return adm_center_crop(image, size)
    # the centre square in source coordinates, resized once: a 1 x 60000 strip never becomes 256 x 15M pixels
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side),
                         reducing_gap=3.0)
    return np.asarray(image, dtype=np.uint8)


def adm_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """guided-diffusion's `center_crop_arr` (image_datasets.py), pixel for pixel: box-filter halvings while the
    short side is at least 2 * size, bicubic to a short side of `size`, then the centre crop."""
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), Image.Resampling.BOX)
    scale = size / min(image.size)
    width, height = round(image.width * scale), round(image.height * scale)
    if width * height > 64 * size * size:   # a thin strip scaled up: gigabytes for one crop
        raise SkipImage(f"{image.width}x{image.height}: too elongated for --resize adm (over 64:1)")
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    top, left = (height - size) // 2, (width - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def to_unit_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) on any device -> float (B, 3, H, W) in [-1, 1]."""
    return images_uint8.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3) numpy."""
    scaled = (images.detach().float().clamp(-1, 1) + 1) * 127.5
    return scaled.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def image_grid(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """Tile rows of uint8 (N, H, W, 3) images into one uint8 image with white gutters."""
    n_cols = max(len(r) for r in rows)
    height, width = rows[0].shape[1:3]
    grid = np.full((len(rows) * (height + pad) + pad, n_cols * (width + pad) + pad, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            y, x = pad + r * (height + pad), pad + c * (width + pad)
            grid[y:y + height, x:x + width] = image
    return grid


def save_png(path: str | os.PathLike, image: np.ndarray, upscale: int = 1) -> None:
    picture = Image.fromarray(image)
    if upscale > 1:
        picture = picture.resize((picture.width * upscale, picture.height * upscale), Image.Resampling.NEAREST)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")


def load_image_batch(source: str | os.PathLike, count: int, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The first `count` images of a shard folder (val split if it has one), an image folder or one file.

    Returns uint8 (n, size, size, 3) and labels (shard folders with classes) or None.
    """
    from vqgpt.shards import MANIFEST_NAME, ShardError, ShardSplit

    source = Path(source)
    if (source / MANIFEST_NAME).is_file():
        split_name = "val" if ShardSplit(source, "train").manifest["splits"].get("val", {}).get("count") else "train"
        split = ShardSplit(source, split_name)
        if split.item_shape != (size, size, 3):
            raise ShardError(f"{source}: images are {split.item_shape}, the VQGAN takes {size}x{size}")
        return split.read(np.arange(min(count, len(split))))
    files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if source.is_dir() else [source]
    images = []
    for path in files:
        try:
            images.append(load_square_image(path, size))
        except SkipImage as err:
            print(f"{path}: skipped ({err})")
        if len(images) == count:
            break
    if not images:
        raise ShardError(f"{source}: no usable image to complete")
    return np.stack(images), None
