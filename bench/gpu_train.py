"""Training-engine throughput against a raw loop of the same model, batch, input size and precision.

    python bench/gpu_train.py --npz PATH/pneumoniamnist.npz [--jpegs 8000] [--out results.json]
                              [--sweep] [--attribute] [--profile FOLDER]

Cases (each: steady-state engine img/s from `engine.train`, warm-up steps excluded, over the raw rate, which
is measured right before and right after the engine and averaged):
  resnet50-224-jpeg   resnet50 at 224 px from JPEG files (synthetic photos written by this script), through the
                      decoded cache; measured held on the GPU and streamed from the memory-mapped cache
  small-28-npz        the small-input CNN (resnet18_small) at native 28 px, 1 channel, from the MedMNIST .npz
The raw loop is a bare forward + backward + fused AdamW step on random tensors already on the device, with
bf16 autocast and channels_last on a GPU as the engine uses; it is also run at batch sizes 64-512 to show that
the engine's default batch is not one that flatters the ratio. Imports only the engine and its data code (no
Prefect, MLflow or pydantic), so it runs on a bare GPU machine with torch and timm.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import statistics
import tempfile
import time
from dataclasses import replace
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from visionroute.data.dataset import assign_splits, native_shape, scan_dataset
from visionroute.training import augment, loader
from visionroute.training.engine import (
    TrainConfig,
    _autocast,
    build_model,
    default_batch_size,
    pick_device,
    prepare_data,
    train,
)
from visionroute.training.preprocessing import Preprocessing
from visionroute.training.recipes import SCRATCH


def raw_images_per_s(model, batch: int, channels: int, size: int, device: torch.device, steps: int) -> float:
    """Median step rate of a bare training loop on device-resident random tensors (warm-up excluded)."""
    model = model.to(device).train()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    fused = {"fused": True} if device.type == "cuda" else {}
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4, **fused)
    x = torch.randn(batch, channels, size, size, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,), device=device)

    def step() -> None:
        with _autocast(device):
            loss = F.cross_entropy(model(x), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    # Timed in groups of steps so that a GPU is measured as it runs, pipelined, not synchronised every step.
    return _timed(step, batch, device, steps)


def step_attribution(model_name, data, prep, batch: int, device: torch.device, steps: int) -> dict:
    """img/s of training steps that add the engine's parts one at a time to the raw loop, same model and
    process, timed like the raw loop: where the engine's time over raw goes, without its epoch loop."""
    from visionroute.training.augment import augmented, steps_together
    from visionroute.training.engine import WeightAverage, _make_optimizer, training_loss
    from visionroute.training.step import EagerStep, GraphedStep

    config = TrainConfig.from_recipe(SCRATCH, model_name)
    classes = int(data.train.y.max()) + 1
    model = build_model(model_name, classes, in_chans=prep.channels, input_size=prep.input_size).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimiser = _make_optimizer(config, model, device)
    average = WeightAverage(model, 1.0, 8)
    weights = torch.tensor([1.8, 0.2][:classes] + [1.0] * max(0, classes - 2), device=device)
    feed = loader.BatchFeed(data.train, batch, device)
    generator = torch.Generator(device=device).manual_seed(0)
    fixed = torch.randn(batch, prep.channels, prep.input_size, prep.input_size, device=device)
    fixed_y = torch.randint(0, classes, (batch,), device=device)

    def batches(augment: bool, together: int):
        while not augment:
            yield fixed, fixed_y
        while True:  # epochs of the real split, as the engine feeds them
            epoch = feed.epoch(torch.randperm(len(feed)))
            yield from augmented(epoch, prep, config.augmentation, generator, together)

    def plain_loss(x, y):
        with _autocast(device):
            return F.cross_entropy(model(x), y)

    def engine_loss(x, y):
        return training_loss(model, x, y, config, weights)

    def run(augment: bool, together: int, train_step, averaged: bool) -> float:
        source = batches(augment, together)

        def step() -> None:
            train_step(*next(source), 0.5)
            if averaged:
                average.update()

        return _timed(step, batch, device, steps)

    ahead = steps_together(device, batch, prep.channels, prep.input_size)
    plain, engine = EagerStep(model, optimiser, plain_loss), EagerStep(model, optimiser, engine_loss)
    rates = {
        "raw step (fixed random batch, plain loss)": run(False, 1, plain, False),
        "+ engine loss (class weights, label smoothing)": run(False, 1, engine, False),
        "+ feed and augmentation, batch by batch": run(True, 1, engine, False),
        f"+ feed and augmentation, {ahead} batches at a time": run(True, ahead, engine, False),
        f"+ weight average (the engine's eager step, {ahead} ahead)": run(True, ahead, engine, True),
    }
    if device.type == "cuda":  # last: the graph turns the optimizer's learning rates into tensors
        graphed = GraphedStep(model, optimiser, engine_loss, device)
        rates["the same, replayed from a CUDA graph (the engine's step)"] = run(True, ahead, graphed, True)
    return rates


def graph_check(model_name, data, prep, batch: int, device: torch.device, steps: int = 12) -> dict:
    """The same batches through an eager and a graphed training step from the same weights: the graph must
    train as the eager loop does (bf16 and cuDNN's atomics make the two differ in the last bits)."""
    from visionroute.training.augment import augment_batch
    from visionroute.training.engine import _make_optimizer, training_loss
    from visionroute.training.step import EagerStep, GraphedStep

    config = TrainConfig.from_recipe(SCRATCH, model_name)
    feed = loader.BatchFeed(data.train, batch, device)
    generator = torch.Generator(device=device).manual_seed(0)
    batches = []
    while len(batches) < steps:
        for stored, labels in feed.epoch(torch.randperm(len(feed))):
            batches.append((augment_batch(stored, prep, config.augmentation, generator), labels))
    weights = torch.tensor([1.8, 0.2], device=device)
    runs = {}
    for graphed in (False, True):
        torch.manual_seed(0)
        model = build_model(model_name, 2, in_chans=prep.channels, input_size=prep.input_size).to(device)
        model = model.to(memory_format=torch.channels_last).train()
        optimiser = _make_optimizer(config, model, device)

        def loss_fn(x, y, model=model):
            return training_loss(model, x, y, config, weights)

        step = (
            GraphedStep(model, optimiser, loss_fn, device)
            if graphed
            else EagerStep(model, optimiser, loss_fn)
        )
        losses = [float(step(x, y, min(1.0, (i + 1) / 4))) for i, (x, y) in enumerate(batches[:steps])]
        runs[graphed] = (losses, torch.cat([p.detach().float().flatten() for p in model.parameters()]))
    (eager, eager_w), (graph, graph_w) = runs[False], runs[True]
    return {
        "eager_losses": [round(v, 4) for v in eager],
        "graphed_losses": [round(v, 4) for v in graph],
        "max_loss_difference": round(max(abs(a - b) for a, b in zip(eager, graph, strict=True)), 5),
        "weights_relative_difference": float((eager_w - graph_w).norm() / eager_w.norm()),
    }


def _timed(step, batch: int, device: torch.device, steps: int) -> float:
    """Median img/s over groups of steps, after three warm-up steps (as `raw_images_per_s`)."""
    for _ in range(3):
        step()
    rates = []
    group = 5 if device.type == "cuda" else 1
    for _ in range(max(1, steps // group)):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(group):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(batch * group / (time.perf_counter() - started))
    return round(statistics.median(rates), 1)


def _write_jpeg(task: tuple[str, int, int]) -> None:
    path, label, seed = task
    rng = np.random.default_rng(seed)
    # Smooth random photos (low-frequency noise upsampled, plus a class-dependent tint): realistic JPEG sizes.
    low = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    image = Image.fromarray(low).resize((500, 375), Image.BICUBIC)
    tint = np.array([label * 25 % 256, 128, 255 - label * 25 % 256], dtype=np.int16)
    array = np.clip(np.asarray(image, dtype=np.int16) // 2 + tint // 2, 0, 255).astype(np.uint8)
    Image.fromarray(array).save(path, quality=90)


def synthetic_jpegs(root: Path, count: int, classes: int = 10, workers: int = 8) -> Path:
    tasks = []
    for index in range(count):
        folder = root / f"class{index % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        tasks.append((str(folder / f"{index:06d}.jpg"), index % classes, index))
    with Pool(workers) as pool:
        pool.map(_write_jpeg, tasks, chunksize=64)
    return root


def engine_case(
    name,
    dataset,
    model_name,
    channels,
    native,
    device,
    epochs,
    cache_root,
    batch=None,
    stream=False,
    profile_to: Path | None = None,
    **recipe_changes,
):
    classes = len(dataset.classes)
    small = model_name.endswith("_small")
    model = build_model(model_name, classes, in_chans=channels, input_size=native if small else None)
    prep = Preprocessing.for_model(model, model_name, dataset.classes, channels, native)
    data = prepare_data(dataset, prep, workers=8, cache_root=cache_root)
    batch = batch or default_batch_size(device, prep)
    loader.GPU_RESIDENT_FRACTION = 0.0 if stream else 0.3
    config = TrainConfig.from_recipe(
        SCRATCH, model_name, max_epochs=epochs, budget_seconds=600, batch_size=batch, patience=99
    )
    config = replace(config, **recipe_changes)

    def raw_rate() -> float:
        raw_model = build_model(model_name, classes, in_chans=channels, input_size=native if small else None)
        steps = 40 if device.type == "cuda" else 6
        return raw_images_per_s(raw_model, batch, channels, prep.input_size, device, steps=steps)

    # The raw loop before and after the engine, the ratio against their mean: on the lent H200 the raw loop's
    # own rate moved by up to a third between consecutive measurements in one process (28 px).
    raw_before = raw_rate()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with _profiled(profile_to, device):
        result = train(config, model, data)
    raw_after = raw_rate()
    raw = (raw_before + raw_after) / 2
    return {
        "case": name
        + (" (streamed from the memory-mapped cache)" if stream else "")
        + "".join(f", {key}={value}" for key, value in recipe_changes.items()),
        "model": model_name,
        "input": f"{channels}x{prep.input_size}x{prep.input_size}, stored {prep.store_side} px",
        "batch": batch,
        "train_images": len(data.train),
        "cache": f"reused in {data.build_seconds:.1f} s"
        if data.reused
        else f"built in {data.build_seconds:.1f} s ({len(dataset.samples) / max(data.build_seconds, 1e-9):.0f} img/s)",
        "engine_images_per_s": round(result.train_images_per_s, 1),
        "raw_images_per_s": round(raw, 1),
        "raw_before_after": [round(raw_before, 1), round(raw_after, 1)],
        "ratio": round(result.train_images_per_s / raw, 3),
        "warmup_seconds": round(result.warmup_seconds, 2),
        "epoch_train_seconds": [h["train_seconds"] for h in result.history],
        "epochs": len(result.history),
        "test_accuracy": round(result.test["accuracy"], 4),
        "cuda_graph": result.cuda_graph,
        "gpu_peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if device.type == "cuda"
        else None,
    }


@contextlib.contextmanager
def _profiled(folder: Path | None, device: torch.device):
    """torch.profiler over the whole run when `folder` is given: the operators by self device time and by
    self host time (tables), and a trace for chrome://tracing or Perfetto. The profiler slows the host side,
    so a profiled case's rate is not a figure; its tables say where a step's time goes."""
    if folder is None:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        yield
    folder.mkdir(parents=True, exist_ok=True)
    averages = profiler.key_averages()
    sort_device = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    (folder / "by_device_time.txt").write_text(averages.table(sort_by=sort_device, row_limit=40))
    (folder / "by_host_time.txt").write_text(averages.table(sort_by="self_cpu_time_total", row_limit=40))
    profiler.export_chrome_trace(str(folder / "trace.json"))


def batch_sweep(model_name, classes, channels, size, device, native=None) -> dict:
    small = model_name.endswith("_small")
    sweep = {}
    for batch in (64, 128, 256, 512):
        model = build_model(model_name, classes, in_chans=channels, input_size=native if small else None)
        sweep[batch] = round(
            raw_images_per_s(model, batch, channels, size, device, steps=30 if device.type == "cuda" else 3),
            1,
        )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npz", help="pneumoniamnist.npz for the 28 px case")
    parser.add_argument(
        "--jpegs", type=int, default=8000, help="synthetic JPEG photos for the 224 px case (0: skip)"
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--jpeg-model", default="resnet50", help="model for the JPEG case (a smaller one for a CPU smoke run)"
    )
    parser.add_argument("--sweep", action="store_true", help="raw rates at batch 64-512 for both models")
    parser.add_argument(
        "--attribute",
        action="store_true",
        help="the 28 px case again without the weight average, without colour jitter, with augmentation "
        "batch by batch and without the CUDA graph; the engine's step built up part by part from the raw loop "
        "(what each costs); on a GPU, the graphed step checked against the eager one",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure the 28 px case this many times (engine and raw each time)",
    )
    parser.add_argument("--profile", help="profile the 28 px case into this folder (tables and a trace)")
    parser.add_argument("--out", help="also write the figures here (JSON)")
    args = parser.parse_args()

    device = pick_device()
    torch.backends.cudnn.benchmark = True  # as `train` sets it: the raw loop before the engine gets it too
    ahead_steps = augment.AHEAD_STEPS
    figures = {
        "machine": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "cases": [],
    }
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        if args.jpegs:
            started = time.perf_counter()
            root = synthetic_jpegs(work / "jpegs", args.jpegs)
            figures["jpegs_written_seconds"] = round(time.perf_counter() - started, 1)
            dataset = assign_splits(scan_dataset(root), seed=0)
            for stream in (False, True):
                figures["cases"].append(
                    engine_case(
                        f"{args.jpeg_model}-224-jpeg",
                        dataset,
                        args.jpeg_model,
                        3,
                        0,
                        device,
                        args.epochs,
                        work / "cache",
                        stream=stream,
                    )
                )
                print(json.dumps(figures["cases"][-1]), flush=True)
            if args.sweep:
                figures[f"raw_sweep_{args.jpeg_model}_224"] = batch_sweep(args.jpeg_model, 10, 3, 224, device)
        if args.npz:
            dataset = assign_splits(scan_dataset(Path(args.npz), ["normal", "pneumonia"]), seed=0)
            channels, native = native_shape(dataset)
            small = ("small-28-npz", dataset, "resnet18_small", channels, native, device, args.epochs * 3)
            changes = [{} for _ in range(args.repeat)]
            if args.attribute:
                changes += [
                    {"average_epochs": None},
                    {"augmentation": replace(SCRATCH.augmentation, jitter=0.0)},
                    {"augmented_per_batch": True},
                    {"cuda_graph": False},
                ]
            for change in changes:
                per_batch = change.pop("augmented_per_batch", False)
                augment.AHEAD_STEPS = 1 if per_batch else ahead_steps
                figures["cases"].append(engine_case(*small, work / "cache", **change))
                if per_batch:
                    figures["cases"][-1]["case"] += ", augmented batch by batch"
                augment.AHEAD_STEPS = ahead_steps
                print(json.dumps(figures["cases"][-1]), flush=True)
            if args.attribute:
                prep = Preprocessing.for_model(
                    build_model("resnet18_small", 2, in_chans=channels, input_size=native),
                    "resnet18_small",
                    dataset.classes,
                    channels,
                    native,
                )
                data = prepare_data(dataset, prep, workers=8, cache_root=work / "cache")
                figures["step_attribution_28px"] = step_attribution(
                    "resnet18_small",
                    data,
                    prep,
                    default_batch_size(device, prep),
                    device,
                    steps=40 if device.type == "cuda" else 4,
                )
                print(json.dumps(figures["step_attribution_28px"], indent=1), flush=True)
                if device.type == "cuda":
                    figures["graph_check_28px"] = graph_check(
                        "resnet18_small", data, prep, default_batch_size(device, prep), device
                    )
                    print(json.dumps(figures["graph_check_28px"]), flush=True)
            if args.profile:
                # Two epochs: the first with the one-off warm-up, one steady; the trace stays small enough to open.
                profiled = engine_case(*small[:-1], 2, work / "cache", profile_to=Path(args.profile))
                figures["profiled_28px"] = {"folder": args.profile, "epochs": profiled["epochs"]}
                print(f"profile of the 28 px case written to {args.profile}", flush=True)
            if args.sweep:
                figures["raw_sweep_resnet18_small_28"] = batch_sweep(
                    "resnet18_small", 2, channels, native, device, native
                )
    figures["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(figures, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
