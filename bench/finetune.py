"""Fine-tune benchmark: accuracy, wall time, and training throughput against a raw loop in the same process.

    python bench/finetune.py ../shared/datasets/hymenoptera_data [--model tf_efficientnet_lite0] [--budget 90]
        [--set average_epochs=1.0 --set frozen_fraction=0.25]

Reports the accuracy on the held-out split (hymenoptera's val/ folder; early stopping uses a slice of train),
wall seconds from scan to test metrics, training images/s, the ratio of that to a raw forward+backward+step
loop of the same model, batch size and input size on random tensors, and peak RSS.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import platform
import resource
import statistics
import time

import torch
from raw_step import median_step_rate

from visionroute.data.dataset import assign_splits, scan_dataset
from visionroute.training.engine import (
    TrainConfig,
    _set_bn_eval,
    build_model,
    freeze_front,
    precision,
    prepare_data,
    train,
)
from visionroute.training.preprocessing import Preprocessing
from visionroute.training.recipes import FINETUNE
from visionroute.training.weights import load_pretrained, resolve_pretrained


def raw_images_per_s(
    model_name: str, num_classes: int, batch: int, size: int, frozen_fraction: float, steps: int = 12
) -> float:
    """A bare timm loop on random tensors: the ceiling the engine's training throughput is compared with.
    Median step throughput, as for the engine: single steps on this machine occasionally stall 10x."""
    model = build_model(model_name, num_classes)
    model.train()
    # The engine, on small data, freezes BN statistics and the front of the backbone: compare like with like.
    _set_bn_eval(model)
    freeze_front(model, frozen_fraction)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, num_classes, (batch,))
    # In the engine's precision: bf16 on a CPU with AMX-BF16 or AVX512-BF16. The first step is excluded on both
    # sides (one-off set-up).
    return median_step_rate(model, optimiser, x, y, steps, bf16=precision(x.device) == "bf16")


SETTABLE = tuple(
    f.name for f in dataclasses.fields(FINETUNE) if f.name not in ("name", "max_epochs", "augmentation")
)
"""Recipe fields `--set` may override (max_epochs has --epochs; augmentation is not a literal)."""
ANNOTATIONS = {f.name: str(f.type) for f in dataclasses.fields(FINETUNE)}


def recipe_overrides(assignments: list[str]) -> dict:
    """`--set FIELD=VALUE` pairs as TrainConfig overrides, checked before anything is timed or decoded."""
    overrides = {}
    for assignment in assignments:
        name, _, text = assignment.partition("=")
        if name not in SETTABLE or not text:
            raise SystemExit(f"--set {assignment}: expected FIELD=VALUE, FIELD one of {', '.join(SETTABLE)}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word: optimizer=sgd
        default = getattr(FINETUNE, name)
        if isinstance(default, bool):
            allowed: tuple[type, ...] = (bool,)
        elif default is None or isinstance(default, float):
            allowed = (int, float)
        else:
            allowed = (type(default),)
        if "None" in ANNOTATIONS[name]:  # patience, average_epochs, class_weighted_above
            allowed += (type(None),)
        if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
            expected = " or ".join(t.__name__ for t in allowed)
            raise SystemExit(f"--set {assignment}: {name} takes {expected}, not {type(value).__name__}")
        overrides[name] = value
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_root")
    parser.add_argument("--model", default="tf_efficientnet_lite2")
    parser.add_argument("--budget", type=float, default=90.0, help="wall-clock budget in seconds")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a field of the fine-tune recipe (a Python literal), e.g. average_epochs=1.0",
    )
    args = parser.parse_args()
    overrides = recipe_overrides(args.set)
    frozen_fraction = overrides.get("frozen_fraction", FINETUNE.frozen_fraction)

    batch = 8
    # Baseline first, in a fresh process state; peak RSS is read before it so it counts training alone.
    dataset_classes = len(scan_dataset(args.data_root).classes)
    size = build_model(args.model, dataset_classes).pretrained_cfg["input_size"][-1]
    raw = raw_images_per_s(args.model, dataset_classes, batch, size, frozen_fraction)
    started = time.perf_counter()
    dataset = assign_splits(scan_dataset(args.data_root), seed=args.seed)
    model = build_model(args.model, len(dataset.classes))
    load_pretrained(model, resolve_pretrained(args.model, model), len(dataset.classes))
    prep = Preprocessing.for_model(model, args.model, dataset.classes)
    data = prepare_data(dataset, prep)
    config = TrainConfig.from_recipe(
        FINETUNE,
        args.model,
        max_epochs=args.epochs,
        batch_size=batch,
        seed=args.seed,
        budget_seconds=args.budget - (time.perf_counter() - started),
        **overrides,
    )
    result = train(config, model, data)
    wall = time.perf_counter() - started
    engine_rate = statistics.median(result.step_images_per_s)
    figures = {
        "model": args.model,
        "overrides": overrides,
        "held_out_accuracy": round(result.test["accuracy"], 4),
        "held_out_examples": result.test["examples"],
        "probe_val_accuracy": result.probe and round(result.probe["val_accuracy"], 4),
        "epochs_run": len(result.history),
        "epoch_val_accuracy": [round(r["val_accuracy"], 4) for r in result.history],
        "epoch_seconds": [r["seconds"] for r in result.history],
        "best_epoch": result.best_epoch,
        "stopped": result.stopped,
        "wall_seconds": round(wall, 1),
        "train_images_per_s_end_to_end": round(result.train_images_per_s, 2),
        "train_images_per_s_median_step": round(engine_rate, 2),
        "raw_images_per_s_median_step": round(raw, 2),
        "throughput_ratio": round(engine_rate / raw, 3),
        "warmup_seconds": round(result.warmup_seconds, 2),
        "frozen_tensors": result.frozen_tensors,
        "batch": batch,
        "input_size": prep.input_size,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "skipped": len(dataset.skipped) + len(data.rejected),
        "decode_seconds": round(data.build_seconds, 1),
        "precision": precision(torch.device("cpu")),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
