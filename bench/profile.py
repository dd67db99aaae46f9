"""Profiling throughput: scan + validate (decode, sha256, dHash, quarantine, duplicates) against bare PIL.

    python bench/profile.py ../shared/datasets/neu_steel_defects ../shared/datasets/hymenoptera_data

Both sides use 2 threads over the same files. The bare loop is `Image.open(path).load()` (a full decode); ours
decodes JPEGs at reduced scale (the whole entropy-coded stream is still read, so corruption is caught).
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from visionroute.data.dataset import scan_dataset
from visionroute.data.images import IMAGE_SUFFIXES
from visionroute.data.validation import validate


def bare_decode(paths: list[Path], workers: int = 2) -> float:
    def load(path: Path) -> None:
        with Image.open(path) as image:
            image.load()

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(load, paths))
    return len(paths) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+")
    args = parser.parse_args()
    for root in map(Path, args.roots):
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        bare_decode(paths[:50])  # warm the page cache on both sides alike
        bare = max(bare_decode(paths) for _ in range(2))
        runs = []
        for _ in range(2):
            started = time.perf_counter()
            dataset, report = validate(scan_dataset(root), progress=False)
            runs.append(len(paths) / (time.perf_counter() - started))
        ours = max(runs)
        print(
            json.dumps(
                {
                    "dataset": root.name,
                    "images": len(paths),
                    "bare_pil_decode_images_per_s": round(bare, 1),
                    "validate_images_per_s": round(ours, 1),
                    "ratio": round(ours / bare, 2),
                    "quarantined": len(report.quarantined),
                    "exact_duplicate_groups": len(report.exact_duplicates),
                    "near_duplicate_pairs": len(report.near_duplicates),
                    "label_conflicts": len(report.label_conflicts),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
