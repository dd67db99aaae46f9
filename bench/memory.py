"""Peak memory of `visionroute run` on a dataset larger than anything the tests use.

    python bench/memory.py [--images 50000] [--size 64] [--budget-minutes 2] [--keep DIR]

Writes N synthetic JPEGs (10 classes, size x size px) in class folders, a scratch spec with a short budget, runs
`visionroute run` on it in a child process (its own state folder and ephemeral Prefect server) and reports the
largest resident set of any process it waited for (the run itself), the wall time and the run's figures.
Target (issue 7): peak RSS < 3 GB for 50,000 images on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image


def _write(task: tuple[str, int, int, int]) -> None:
    path, label, seed, size = task
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    array = np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC), dtype=np.int16)
    array[label * size // 10 : label * size // 10 + size // 10] += 60  # a class-dependent band
    Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(path, quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--budget-minutes", type=float, default=2.0)
    parser.add_argument("--keep", help="write the data here and keep it (default: a temporary folder)")
    args = parser.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="vr-memory-"))
    data = root / "data"
    started = time.perf_counter()
    if not data.exists():
        tasks = []
        for index in range(args.images):
            folder = data / f"class{index % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            tasks.append((str(folder / f"{index:06d}.jpg"), index % 10, index, args.size))
        with Pool(os.cpu_count()) as pool:
            pool.map(_write, tasks, chunksize=256)
    written = time.perf_counter() - started
    spec = root / "far.yaml"
    spec.write_text(
        "name: memory-bench\ntask: classify\ndata: {path: ./data}\ndomain: radar\nroute: scratch\n"
        "constraints: {external_api_allowed: false}\n"
        f"training: {{budget_minutes: {args.budget_minutes}, epochs: 2}}\n"
    )
    env = {
        **os.environ,
        "VISIONROUTE_STATE": str(root / "state"),
        "PREFECT_HOME": str(root / "prefect"),
        "VISIONROUTE_NO_BAR": "1",
    }
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    run_started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "visionroute.cli", "run", str(spec)], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - run_started
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    figures = {
        "images": args.images,
        "size": args.size,
        "exit_code": done.returncode,
        "peak_rss_mb": round(peak_mb),
        "target_mb": 3072,
        "run_wall_seconds": round(wall, 1),
        "write_seconds": round(written, 1),
        "summary": next(
            (line for line in (done.stdout + done.stderr).splitlines() if "test accuracy" in line), ""
        ),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
    }
    if done.returncode:
        figures["error_tail"] = done.stderr[-2000:]
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
