"""Profiling throughput and the domain measurement on real datasets.

    python bench/data_profile.py ../shared/datasets/neu_steel_defects ../shared/datasets/hymenoptera_data \
        [--domain ../shared/datasets/pneumoniamnist/pneumoniamnist.npz ...] [--limit 1000]

Throughput: scan + validate (decode, sha256, thumbnail signature, quarantine, duplicates) against a bare
`Image.open(path).load()` loop, both with 2 threads over the same files (ours decodes JPEGs at reduced scale: the
whole entropy-coded stream is still read, so corruption is caught). Domain: kNN accuracy and LogME of
pretrained against random features, with the wall time of the measurement, for every dataset given.
"""

from __future__ import annotations

import os
import sys

# This file's name shadows the standard library's `profile`, which torch imports (via cProfile): take this
# folder off the import path before anything imports torch.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

from PIL import Image  # noqa: E402

from visionroute.data.dataset import scan_dataset  # noqa: E402
from visionroute.data.domain import measure_domain  # noqa: E402
from visionroute.data.images import IMAGE_SUFFIXES  # noqa: E402
from visionroute.data.validation import validate  # noqa: E402


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
    parser.add_argument("roots", nargs="*", help="image folders: throughput and domain measurement")
    parser.add_argument("--domain", nargs="*", default=[], help="more datasets (e.g. an .npz): domain only")
    parser.add_argument("--limit", type=int, default=1000, help="images in the domain measurement's sample")
    args = parser.parse_args()
    for path in args.roots + args.domain:
        measurement = measure_domain(scan_dataset(Path(path)), limit=args.limit, progress=False)
        print(json.dumps({"dataset": Path(path).name, **measurement.to_dict()}))
    for root in map(Path, args.roots):
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        bare_decode(paths[:50])  # warm the page cache on both sides alike
        bare = max(bare_decode(paths) for _ in range(3))
        runs = []
        for _ in range(3):
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
