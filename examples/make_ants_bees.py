"""Rebuild examples/data/ants_bees from the full hymenoptera photos.

The demo must run with nothing outside the repo, so a downscaled copy (short side 224 px, JPEG q78,
a few MB) is committed. This script documents how it was made:

    python examples/make_ants_bees.py ../shared/datasets/hymenoptera_data examples/data/ants_bees
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageOps

SHORT_SIDE = 224
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png"}


def main(src: Path, dst: Path) -> None:
    count = 0
    for path in sorted(src.rglob("*")):
        if path.suffix.lower() not in PHOTO_SUFFIXES:
            continue  # the dataset's imageNotFound.gif placeholder is not a photo
        out = dst / path.relative_to(src).with_suffix(".jpg")
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
            scale = SHORT_SIDE / min(image.size)
            if scale < 1:
                image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
            image.save(out, quality=78, optimize=True)
        count += 1
    print(f"wrote {count} images under {dst}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
