"""Scratch against fine-tune on PneumoniaMNIST, same budget, official test split.

    python bench/scratch.py PATH/pneumoniamnist.npz [--budget 110] [--routes scratch,finetune] [--seeds 0,1,2]
                            [--out f.json]

scratch: the small-input CNN (resnet18_small) at native 28 px, one channel, the scratch recipe (class-weighted
loss above 3:1 imbalance, decision threshold chosen on validation). finetune: tf_efficientnet_lite0 with its
offline ImageNet weights, the 28 px images stored natively and upsampled to 224 px on the device, the fine-tune
recipe. Each gets the same wall-clock budget from data preparation to test metrics. Reported: accuracy and ROC AUC
on the official 624-image test split (as in the MedMNIST v2 paper), wall seconds, epochs. Imports no Prefect,
MLflow or pydantic.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from visionroute.data.dataset import assign_splits, native_shape, scan_dataset
from visionroute.training.catalogue import catalogue_entry
from visionroute.training.engine import TrainConfig, build_model, pick_device, prepare_data, train
from visionroute.training.preprocessing import Preprocessing
from visionroute.training.recipes import RECIPES
from visionroute.training.weights import load_pretrained, resolve_pretrained

MODELS = {"scratch": "resnet18_small", "finetune": "tf_efficientnet_lite0"}


def run(
    route: str,
    npz: Path,
    budget: float,
    seed: int,
    scale_min: float | None = None,
    patience: int | None = None,
) -> dict:
    started = time.perf_counter()
    recipe, model_name = RECIPES[route], MODELS[route]
    dataset = assign_splits(scan_dataset(npz, ["normal", "pneumonia"]), seed=seed)
    channels, native = native_shape(dataset)
    if recipe.pretrained:
        channels = 3  # ImageNet weights were learned on RGB
    small = catalogue_entry(model_name).small_input
    model = build_model(model_name, 2, in_chans=channels, input_size=native if small else None)
    if recipe.pretrained:
        load_pretrained(model, resolve_pretrained(model_name, model), 2)
    prep = Preprocessing.for_model(model, model_name, dataset.classes, channels, native)
    data = prepare_data(dataset, prep, workers=2)
    overrides = {}
    if scale_min is not None:
        overrides["augmentation"] = replace(recipe.augmentation, scale=(scale_min, 1.0))
    if patience is not None:
        overrides["patience"] = patience
    config = TrainConfig.from_recipe(
        recipe, model_name, seed=seed, budget_seconds=budget - (time.perf_counter() - started), **overrides
    )
    result = train(config, model, data)
    test = result.test
    return {
        "route": route,
        "augment_scale": list(config.augmentation.scale),
        "patience": config.patience,
        "model": model_name,
        "input": f"{prep.channels}x{prep.input_size}x{prep.input_size} (stored {prep.store_side} px)",
        "test_examples": test["examples"],
        "test_accuracy": round(test["accuracy"], 4),
        "test_auc": round(test["auc"], 4) if test.get("auc") is not None else None,
        "balanced_accuracy": round(test["balanced_accuracy"], 4),
        "threshold": round(result.preprocessing.threshold, 4),
        "class_weights": result.class_weights,
        "seed": seed,
        "epochs": len(result.history),
        "val_curve": [
            {k: round(v, 4) for k, v in h.items() if k in ("epoch", "val_accuracy", "val_auc")}
            for h in result.history
        ],
        "best_epoch": result.best_epoch,
        "stopped": result.stopped,
        "train_images_per_s": round(result.train_images_per_s, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "budget_seconds": budget,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("npz", type=Path)
    parser.add_argument("--budget", type=float, default=110.0, help="seconds per route, preparation included")
    parser.add_argument("--routes", default="scratch,finetune")
    parser.add_argument("--seeds", default="0", help="one run per seed (split, initialisation, augmentation)")
    parser.add_argument(
        "--scratch-scales", default="", help="also run scratch with these smallest crop areas, e.g. 0.6,0.9"
    )
    parser.add_argument(
        "--patience",
        type=int,
        help="epochs without a better validation score before stopping (recipe default)",
    )
    parser.add_argument("--out")
    args = parser.parse_args()
    device = pick_device()
    figures = {
        "machine": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d"),
        "runs": [],
    }
    plan = [(route, None) for route in args.routes.split(",")]
    plan += [("scratch", float(scale)) for scale in args.scratch_scales.split(",") if scale]
    for seed in (int(seed) for seed in args.seeds.split(",")):
        for route, scale in plan:
            figures["runs"].append(run(route, args.npz, args.budget, seed, scale, args.patience))
            print(json.dumps(figures["runs"][-1]), flush=True)
    print(json.dumps(figures, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
