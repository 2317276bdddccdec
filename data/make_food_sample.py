"""Build the committed demo/test sample `data/food-sample/` from the shared food101_mini10 subset.

Takes, for every class, the first 64 `train/` and the first 16 `test/` images in sorted file-name
order, shrinks them so the longest side is 128 px and saves them as JPEG quality 85. The split
folders are kept (`train/<class>/`, `test/<class>/`), so ingestion carves `val` from `train`.
Rerunning it rebuilds the sample from scratch and rewrites ATTRIBUTION.md.

    python data/make_food_sample.py [SRC]     # SRC defaults to ../shared/data/food101_mini10
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SRC = REPO.parent / "shared" / "data" / "food101_mini10"
OUT = REPO / "data" / "food-sample"
PER_CLASS = {"train": 64, "test": 16}
MAX_SIDE = 128
QUALITY = 85

ATTRIBUTION = """\
# food-sample: attribution and terms

## Source
- Images: **Food-101** (Bossard, Guillaumin, Van Gool, "Food-101 – Mining Discriminative Components
  with Random Forests", ECCV 2014), ETH Zurich. The photos come from foodspotting.com.
- Taken via the GitHub repository `srohit0/food_mnist` at commit
  `e6cdf589a9937cf7fcb53d3a86df053be452e1f5` (10 Food-101 classes with Food-101's own train/test
  split), through the shared subset `food101_mini10`.

## Terms
As stated in the source repository's `license_agreement.txt`:

> The Food-101 data set consists of images from Foodspotting which are not property of the
> Federal Institute of Technology Zurich (ETHZ). Any use beyond scientific fair use must be
> negotiated with the respective picture owners according to the Foodspotting terms of use.

Use these images only for research, testing, or demonstration. Do not redistribute them commercially.

## How it was made
`python data/make_food_sample.py` (source: `../shared/data/food101_mini10`): for each of the 10
classes, the first {train} `train/` and first {test} `test/` images in sorted file-name order,
downscaled so the longest side is {side} px and saved as JPEG quality {quality} (RGB photos stay RGB,
greyscale stays greyscale; no metadata kept). `train/` and `test/` stay separate, as in Food-101,
so `train-food ingest` carves `val` out of `train`.

Contents: {images} images, {size_mb:.1f} MB.
"""


def shrink(src: Path, dst: Path) -> None:
    """Save src with its longest side at most MAX_SIDE px as JPEG (no EXIF or other metadata)."""
    with Image.open(src) as image:
        image.load()
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
        image.save(dst, format="JPEG", quality=QUALITY)


def build(src: Path, out: Path = OUT) -> int:
    """Rebuild `out` from `src`; returns the number of images written."""
    if not (src / "train").is_dir():
        raise SystemExit(f"{src} has no train/ folder: pass the food101_mini10 path")
    for split in PER_CLASS:
        shutil.rmtree(out / split, ignore_errors=True)
    written = 0
    for split, count in PER_CLASS.items():
        for class_dir in sorted(p for p in (src / split).iterdir() if p.is_dir()):
            (out / split / class_dir.name).mkdir(parents=True, exist_ok=True)
            for image in sorted(class_dir.glob("*.jpg"))[:count]:
                shrink(image, out / split / class_dir.name / image.name)
                written += 1
    return written


def write_attribution(out: Path, images: int) -> None:
    size = sum(p.stat().st_size for p in out.rglob("*.jpg"))
    text = ATTRIBUTION.format(train=PER_CLASS["train"], test=PER_CLASS["test"], side=MAX_SIDE,
                              quality=QUALITY, images=images, size_mb=size / 1e6)
    (out / "ATTRIBUTION.md").write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", nargs="?", type=Path, default=DEFAULT_SRC, help="food101_mini10 folder")
    args = parser.parse_args()
    images = build(args.src)
    write_attribution(OUT, images)
    print(f"wrote {images} images to {OUT}")


if __name__ == "__main__":
    main()
