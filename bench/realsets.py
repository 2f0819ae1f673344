"""Build the two real-image development sets that the quality benchmark and figures use.

    python bench/realsets.py                       # -> data/real/clipart, data/real/photos (about 2 minutes)
    python bench/realsets.py --out data/real --cache ~/.cache/vqgpt-realsets

Both come from packages that nobody on this project made, pinned by version and sha256:
- clipart: Debian's `openclipart-png` (via `apt-get download`), flattened over white, padded to a
  square with white and resized to 64 px; labels are the package's top-level categories. 3,000
  train / 300 val drawings, drawn at random from the 8,121 in the package.
- photos: the colour photographs that the scikit-image wheel bundles (`skimage/data`) and the nature
  photographs of Debian's `mate-backgrounds`: random square crops (64-256 px of the photograph
  with its short side at 256 px) resized to 64 px. Whole photographs are split: the val crops
  come from four photographs that no train crop touches.
Every shard is checked against `bench/realsets.sha256` (sha256sum format); a mismatch stops the
build (`--write-expected` records new hashes after a deliberate change). The sets are for
benchmarks and figures only; `make test` does not need them.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vqgpt.files import sha256_file  # noqa: E402
from vqgpt.images import to_rgb  # noqa: E402
from vqgpt.shards import ShardWriter, build_manifest, write_manifest  # noqa: E402

EXPECTED = Path(__file__).with_name("realsets.sha256")
SIZE = 64
DEBS = {   # package -> (version, sha256 of the .deb)
    "openclipart-png": ("1:0.18+dfsg-19", "f07f1545a2970c2cf3fa339bc2405da1a95cf2b1827bfa05bf73eb1c20291c02"),
    "mate-backgrounds": ("1.26.0-1", "7bf4c2209f34b4f61ba6d24c8b58c28b361e82e4b943aae6d42c030169af9e04"),
}
SKIMAGE = "scikit-image==0.26.0"
CLIPART_ROOT = "usr/share/openclipart/png"
CLIPART_TRAIN, CLIPART_VAL = 3000, 300
# colour photographs only: the wheel's grey, synthetic and graphic images are left out, and
# motorcycle_right too (the stereo twin of motorcycle_left would leak a photograph across the split)
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
                  "motorcycle_left.png", "retina.jpg", "rocket.jpg")
MATE_PHOTOS = tuple(f"usr/share/backgrounds/mate/nature/{name}.jpg" for name in (
    "Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops", "Storm", "TwoWings",
    "Wood", "YellowFlower"))
VAL_PHOTOS = ("chelsea.png", "rocket.jpg", "Garden.jpg", "Storm.jpg")   # an animal, a night scene, red petals, sky
CROPS_TRAIN, CROPS_VAL = 200, 100   # per photograph: 16 x 200 train, 4 x 100 val
PHOTO_SHORT_SIDE = 256


class BuildError(RuntimeError):
    pass


def run(command: list[str], cwd: Path) -> None:
    try:
        subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise BuildError(f"{command[0]} not found: this builder needs Debian's apt-get and dpkg-deb, and pip") from None
    except subprocess.CalledProcessError as err:
        last_line = (err.stderr or "").strip().splitlines()[-1:] or ["no message"]
        raise BuildError(f"{' '.join(command)} failed: {last_line[0]}") from None


def fetch_sources(cache: Path) -> Path:
    """Download and unpack the pinned packages into cache/tree; return that folder."""
    tree = cache / "tree"
    cache.mkdir(parents=True, exist_ok=True)
    for package, (version, expected) in DEBS.items():
        debs = sorted(cache.glob(f"{package}_*.deb"))
        if not debs:
            run(["apt-get", "download", f"{package}={version}"], cache)
            debs = sorted(cache.glob(f"{package}_*.deb"))
        if sha256_file(debs[0]) != expected:
            raise BuildError(f"{debs[0]}: sha256 differs from the pinned {package} {version}; delete it and rerun")
        marker = tree / f".{package}"
        if not marker.exists():
            run(["dpkg-deb", "-x", str(debs[0]), str(tree)], cache)
            marker.touch()
    wheels = sorted(cache.glob("scikit_image-*.whl"))
    if not wheels:
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(cache), SKIMAGE],
            cache)
        wheels = sorted(cache.glob("scikit_image-*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        for name in SKIMAGE_PHOTOS:
            target = tree / "skimage" / name
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(wheel.read(f"skimage/data/{name}"))
    return tree


def clipart_image(path: Path) -> np.ndarray | None:
    """Flatten over white, pad to a white square (the whole drawing stays), resize to SIZE."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)   # a few drawings are 100+ Mpixel
            with Image.open(path) as image:
                image.load()
                image = to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        print(f"  skipped {path.name}: {type(err).__name__}")
        return None
    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    pixels = np.asarray(square.resize((SIZE, SIZE), Image.Resampling.LANCZOS, reducing_gap=3.0), dtype=np.uint8)
    return pixels if pixels.std() >= 4 else None   # blank or nearly blank drawings teach nothing


def build_clipart(tree: Path, dest: Path, seed: int) -> dict:
    root = tree / CLIPART_ROOT
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    classes = sorted({f.split("/", 1)[0] for f in files})
    order = np.random.default_rng(seed).permutation(len(files))
    records, taken, cursor = {}, [], 0
    for split, count in (("val", CLIPART_VAL), ("train", CLIPART_TRAIN)):
        writer = ShardWriter(dest, split, (SIZE, SIZE, 3), np.uint8, 1000, len(classes))
        added = 0
        while added < count:
            name = files[order[cursor]]
            cursor += 1
            pixels = clipart_image(root / name)
            if pixels is not None:
                writer.add(pixels, classes.index(name.split("/", 1)[0]))
                taken.append(name)
                added += 1
        records[split] = writer.close()
    return build_manifest("images", (SIZE, SIZE, 3), np.uint8, {"train": records["train"], "val": records["val"]},
                          classes, image_size=SIZE, seed=seed,
                          source=f"Debian openclipart-png {DEBS['openclipart-png'][0]}", files=taken)


def photo_crops(path: Path, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    with Image.open(path) as image:
        image.draft("RGB", (PHOTO_SHORT_SIDE * 2, PHOTO_SHORT_SIDE * 2))   # JPEG: decode near the target scale
        image = to_rgb(image)
    scale = PHOTO_SHORT_SIDE / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
    crops = []
    for _ in range(count):
        side = int(rng.integers(SIZE, PHOTO_SHORT_SIDE + 1))
        left = int(rng.integers(0, image.width - side + 1))
        top = int(rng.integers(0, image.height - side + 1))
        crop = image.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.Resampling.LANCZOS)
        crops.append(np.asarray(crop, dtype=np.uint8))
    return crops


def build_photos(tree: Path, dest: Path, seed: int) -> dict:
    paths = [tree / "skimage" / name for name in SKIMAGE_PHOTOS] + [tree / name for name in MATE_PHOTOS]
    rng = np.random.default_rng(seed)
    records, sources = {}, {}
    for split in ("train", "val"):
        chosen = [p for p in paths if (p.name in VAL_PHOTOS) == (split == "val")]
        per_photo = CROPS_VAL if split == "val" else CROPS_TRAIN
        crops = [c for p in chosen for c in photo_crops(p, per_photo, rng)]
        shuffled = [crops[i] for i in rng.permutation(len(crops))]
        writer = ShardWriter(dest, split, (SIZE, SIZE, 3), np.uint8, 1000)
        for crop in shuffled:
            writer.add(crop)
        records[split] = writer.close()
        sources[split] = {p.name: sha256_file(p) for p in chosen}
    return build_manifest("images", (SIZE, SIZE, 3), np.uint8, records, [], image_size=SIZE, seed=seed,
                          source=f"{SKIMAGE} skimage/data + Debian mate-backgrounds {DEBS['mate-backgrounds'][0]}",
                          photographs=sources)


def hash_lines(out: Path) -> list[str]:
    files = sorted(p for p in out.rglob("*") if p.is_file())
    return [f"{sha256_file(p)}  {p.relative_to(out).as_posix()}" for p in files]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/real", help="folder for clipart/ and photos/ (default: data/real)")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "vqgpt-realsets"),
                        help="downloaded packages and unpacked files (default: ~/.cache/vqgpt-realsets)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-expected", action="store_true", help=f"record the built hashes in {EXPECTED.name}")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        tree = fetch_sources(Path(args.cache).expanduser())
        with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as staging:
            staging = Path(staging)
            for name, build in (("clipart", build_clipart), ("photos", build_photos)):
                (staging / name).mkdir()
                manifest = build(tree, staging / name, args.seed)
                write_manifest(staging / name, manifest)
                counts = {s: v["count"] for s, v in manifest["splits"].items()}
                print(f"{name}: {counts['train']} train / {counts['val']} val images, {SIZE} px")
            lines = hash_lines(staging)
            if args.write_expected:
                EXPECTED.write_text("\n".join(lines) + "\n")
            elif EXPECTED.exists() and lines != EXPECTED.read_text().splitlines():
                differ = sorted(set(lines) ^ set(EXPECTED.read_text().splitlines()))
                raise BuildError(f"the rebuilt sets differ from {EXPECTED.name} ({len(differ)} lines, first: "
                                 f"{differ[0][66:]}); another Pillow or numpy may resize differently")
            for name in ("clipart", "photos"):
                if (out / name).exists():
                    shutil.rmtree(out / name)
                out.mkdir(parents=True, exist_ok=True)
                (staging / name).rename(out / name)
    except BuildError as err:
        print(f"realsets: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}/clipart and {out}/photos; sha256 {'recorded in' if args.write_expected else 'match'} "
          f"{EXPECTED.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
