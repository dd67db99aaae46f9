"""The catalogue's CPU planning rates: a whole-network training step per model, in fp32 and in bf16 autocast.

    python bench/cpu_rates.py [--models tf_efficientnet_lite0,tf_efficientnet_lite2] [--batch 8] [--steps 8]
        [--threads 2]

`model: auto` picks the largest model whose three epochs fit the budget at `cpu_train_images_per_s` (fp32) or,
on CPUs with bf16 instructions, `cpu_bf16_train_images_per_s` (visionroute/training/catalogue.py). This
measures both the way the engine trains on a CPU: batch 8, every parameter trained, the model's native input
size, AdamW, median step throughput (single steps on a shared machine occasionally stall 10x). Each precision
is timed twice, in alternating order, and the slower of the two kept: planning figures should not be a good
moment's.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from raw_step import median_step_rate

from visionroute.training.catalogue import CATALOGUE
from visionroute.training.engine import build_model


def step_rate(model_name: str, batch: int, steps: int, bf16: bool) -> float:
    entry = CATALOGUE[model_name]
    channels = 1 if entry.small_input else 3  # the small-input model is for 28 px grey data
    model = build_model(model_name, num_classes=2, in_chans=channels).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, channels, entry.input_size, entry.input_size)
    y = torch.randint(0, 2, (batch,))
    return median_step_rate(model, optimiser, x, y, steps, bf16)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be 1 or more")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(CATALOGUE), help="comma-separated catalogue names")
    parser.add_argument("--batch", type=positive, default=8, help="the engine's CPU batch size")
    parser.add_argument("--steps", type=positive, default=8, help="timed steps per measurement")
    parser.add_argument(
        "--threads",
        type=positive,
        default=2,
        help="intra-op threads: the catalogue's figures are for 2 cores",
    )
    args = parser.parse_args()
    models = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in models if name not in CATALOGUE]
    if unknown or not models:
        named = f"not in the catalogue: {', '.join(unknown)}" if unknown else "no model named"
        raise SystemExit(f"--models {args.models!r}: {named}; use some of {', '.join(CATALOGUE)}")
    torch.set_num_threads(args.threads)
    rows = []
    for name in models:
        fp32, bf16 = [], []
        for bf16_first in (False, True):
            for use_bf16 in (bf16_first, not bf16_first):
                (bf16 if use_bf16 else fp32).append(step_rate(name, args.batch, args.steps, use_bf16))
        row = {
            "model": name,
            "fp32_images_per_s": [round(r, 1) for r in fp32],
            "bf16_images_per_s": [round(r, 1) for r in bf16],
            "planning_fp32": round(min(fp32), 1),
            "planning_bf16": round(min(bf16), 1),
            "catalogue_fp32": CATALOGUE[name].cpu_train_images_per_s,
            "catalogue_bf16": CATALOGUE[name].cpu_bf16_train_images_per_s,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    machine = {
        "machine": platform.machine(),
        "cpu": capabilities.get("cpu_name", ""),
        "threads": torch.get_num_threads(),
        "amx_bf16": bool(capabilities.get("amx_bf16")),
        "avx512_bf16": bool(capabilities.get("avx512_bf16")),
        "batch": args.batch,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps({"machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
