"""A training route as one tracked run: data, train, evaluate, log to MLflow, register. Used by the
training backend for both recipes (finetune, scratch)."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from visionroute import model_registry, tracking
from visionroute.backends.base import BackendContext, BackendResult, BackendUnavailable
from visionroute.data.dataset import DatasetError, assign_splits
from visionroute.data.validation import leaked_test_images
from visionroute.training import distributed
from visionroute.training.cache import cache_key
from visionroute.training.catalogue import catalogue_entry, choose_model
from visionroute.training.engine import (
    TrainConfig,
    evaluate,
    prepare_data,
    train,
    training_device,
)
from visionroute.training.metrics import format_accuracy, plot_confusion_matrix
from visionroute.training.preprocessing import Preprocessing
from visionroute.training.weights import PretrainedWeights, load_pretrained


def model_for(context: BackendContext, route: str, hub: bool) -> str:
    """The spec's model, or the auto choice for this route, data size, budget and device. First thing a
    training backend calls: it refuses what no training route can do before anything is built."""
    spec = context.spec
    if spec.task.value != "classify" and spec.task.value != "tag":
        raise BackendUnavailable(
            f"the {route} backend trains image classifiers; training a '{spec.task.value}' model is not supported "
            "yet. Use route vision_api (provider local keeps images on premises)."
        )
    if context.dataset is None:
        raise BackendUnavailable(f"the {route} route needs labelled images: set data.path in the spec")
    name = spec.training.model
    if context.decision.model and context.decision.route == route:
        name = context.decision.model  # the model the decision named and priced is the model trained
    elif name == "auto":
        examples = len(context.dataset.samples) if context.dataset else 0
        name = choose_model(route, examples, spec.training.budget_minutes, device=training_device(), hub=hub)
    catalogue_entry(name)  # a clear error for a name outside the catalogue
    return name


def run_training_route(
    context: BackendContext,
    route: str,
    config: TrainConfig,
    model: torch.nn.Module,
    weights: PretrainedWeights | None,
    channels: int = 3,
    native_size: int = 0,
) -> BackendResult:
    spec = context.spec
    dataset = assign_splits(context.dataset, seed=config.seed)
    classes = dataset.classes
    client = tracking.configure()
    with tracking.run(
        client,
        spec.name,
        f"{route}-{config.model_name}",
        {"visionroute.route": route, "visionroute.model": config.model_name},
        context.parent_run_id,
    ) as run_id:
        if weights is not None:
            load_pretrained(model, weights, len(classes))
        prep = Preprocessing.for_model(model, config.model_name, classes, channels, native_size)
        tracking.log_params(
            client,
            run_id,
            {
                "model": config.model_name,
                "weights": weights.source if weights else "random init",
                "max_epochs": config.max_epochs,
                "budget_seconds": config.budget_seconds,
                "lr_head": config.lr_head,
                "lr_backbone": config.lr_backbone,
                "label_smoothing": config.label_smoothing,
                "seed": config.seed,
                "input_size": prep.input_size,
                "stored_size": prep.store_side,
                "channels": prep.channels,
                "optimizer": config.optimizer,
                "classes": classes,
                "processes": distributed.world_size(),
            },
        )
        tracking.log_json(client, run_id, dataset.split_manifest(), "data/split.json")

        cache_root = _cache_root()
        data = prepare_data(dataset, prep, workers=config.decode_workers, cache_root=cache_root)
        client.set_tag(
            run_id,
            "visionroute.decoded_cache",
            "reused" if data.reused else f"built in {data.build_seconds:.1f} s",
        )
        skipped = [{"path": s.path, "reason": s.reason} for s in dataset.skipped]
        skipped += [{"path": ref, "reason": reason} for ref, reason in data.rejected.items()]
        tracking.log_json(client, run_id, skipped, "data/skipped.json")
        if data.rejected:
            dataset = dataset.without(data.rejected)
        for split in ("train", "val", "test"):
            if not dataset.split(split):
                raise DatasetError(f"the {split} split is empty after skipping bad files; add more images")

        def on_epoch(record: dict) -> None:
            tracking.log_metrics(
                client,
                run_id,
                {k: v for k, v in record.items() if k not in ("epoch", "epochs")},
                step=record["epoch"],
            )
            if context.on_progress:
                context.on_progress(record)

        # Checkpoints live per task and run identity, so that a re-run after a crash (or a Prefect retry)
        # finds and resumes them; another spec, data or configuration gets another folder and starts fresh.
        _point_at_checkpoints(config, spec, dataset, prep)
        result = train(config, model, data, on_epoch=on_epoch)
        if result.resumed_from_epoch:
            client.set_tag(run_id, "visionroute.resumed_from_epoch", str(result.resumed_from_epoch))
        if result.class_weights:  # the recipe weighted the loss: the data was imbalanced beyond its ratio
            client.set_tag(
                run_id,
                "visionroute.class_weights",
                json.dumps(dict(zip(classes, result.class_weights, strict=True))),
            )
        if result.frozen_tensors:  # small data: the front of the backbone kept its pretrained weights
            client.set_tag(run_id, "visionroute.frozen_tensors", str(result.frozen_tensors))
        prep = result.preprocessing

        test = result.test
        summary = {
            f"test_{k}": test[k]
            for k in ("accuracy", "balanced_accuracy", "macro_f1", "auc")
            if test.get(k) is not None
        }
        if "threshold" in test:
            summary["decision_threshold"] = test["threshold"]
        summary["test_accuracy_ci95_low"], summary["test_accuracy_ci95_high"] = test["accuracy_ci95"]
        # A given test split keeps its images that copy train/val ones (data.leakage: report); the accuracy
        # without them is the second figure.
        leaked = {s.ref for s in leaked_test_images(dataset)}
        if leaked:
            keep = [i for i, ref in enumerate(data.test.refs) if ref not in leaked]
            clean = evaluate(result.model, data.test.x[keep], data.test.y[keep], prep)
            test["without_leaked"] = {k: clean[k] for k in ("accuracy", "accuracy_ci95", "examples")}
            summary["test_leaked_images"] = len(data.test.refs) - len(keep)
            summary["test_accuracy_without_leaked"] = clean["accuracy"]
        for name, scores in test["per_class"].items():
            summary[f"test_precision_{name}"] = scores["precision"]
            summary[f"test_recall_{name}"] = scores["recall"]
        summary.update(
            {
                "train_seconds": result.seconds,
                "train_images_per_s": result.train_images_per_s,
                "warmup_seconds": result.warmup_seconds,
                "best_epoch": result.best_epoch,
                "epochs_run": len(result.history),
                "skipped_files": len(skipped),
            }
        )
        if result.probe:
            summary["probe_val_accuracy"] = result.probe["val_accuracy"]
        tracking.log_metrics(client, run_id, summary)
        client.set_tag(run_id, "visionroute.stopped", result.stopped)
        client.set_tag(run_id, "visionroute.cuda_graph", str(result.cuda_graph).lower())
        client.set_tag(run_id, "visionroute.precision", result.precision)
        tracking.log_json(
            client,
            run_id,
            {"test": test, "history": result.history, "probe": result.probe},
            "evaluation/metrics.json",
        )
        with tempfile.TemporaryDirectory() as folder:
            png = plot_confusion_matrix(
                test["confusion_matrix"],
                classes,
                Path(folder) / "confusion_matrix.png",
                f"{spec.name}: test split ({test['examples']} images)",
            )
            client.log_artifact(run_id, str(png), "evaluation")

        model_uri = model_registry.log_model(run_id, result.model, prep)

        def test_set(champion_prep: Preprocessing) -> tuple[torch.Tensor, torch.Tensor]:
            if (champion_prep.store_side, champion_prep.channels) == (prep.store_side, prep.channels):
                return torch.from_numpy(np.array(data.test.x)), torch.from_numpy(data.test.y)
            samples = [s for s in dataset.split("test") if s.ref not in data.rejected]
            stored = [champion_prep.to_stored(dataset.load(s)) for s in samples]
            return torch.from_numpy(np.stack(stored)), torch.tensor([s.label for s in samples])

        registration = model_registry.register_and_promote(
            client,
            spec.name,
            model_uri,
            run_id,
            test,
            dataset.split_digest("test"),
            classes,
            test_set,
            tags={
                "route": route,
                "rule": context.decision.rule,
                "model": config.model_name,
                "weights": weights.source if weights else "random init",
            },
        )
        tracking.log_json(client, run_id, registration.comparison, "registry/comparison.json")
    # Registered: the checkpoints were for a crash before this point; a later run of the task trains afresh.
    shutil.rmtree(config.checkpoint_dir, ignore_errors=True)
    clean = test.get("without_leaked")
    text = (
        (f"resumed from epoch {result.resumed_from_epoch}; " if result.resumed_from_epoch else "")
        + f"{route} {config.model_name}: test accuracy {format_accuracy(test)}"
        + (
            f" ({clean['accuracy']:.4f} on the {clean['examples']} test images without a copy in train/val)"
            if clean
            else ""
        )
        + f", registered {spec.name} v{registration.version}"
        + (" as champion" if registration.promoted else f" as challenger ({registration.comparison['why']})")
        + f"; {len(skipped)} file(s) skipped"
    )
    return BackendResult(
        route=route,
        run_id=run_id,
        metrics=summary,
        model_name=spec.name,
        model_version=registration.version,
        promoted=registration.promoted,
        summary=text,
    )


def follow_training_route(
    context: BackendContext,
    route: str,
    config: TrainConfig,
    model: torch.nn.Module,
    weights: PretrainedWeights | None,
    channels: int = 3,
    native_size: int = 0,
) -> BackendResult:
    """A data-parallel rank other than 0: the same data, split, model and checkpoint folder as rank 0's
    `run_training_route`, trained in step with it, with nothing logged or registered."""
    spec = context.spec
    dataset = assign_splits(context.dataset, seed=config.seed)
    if weights is not None:
        load_pretrained(model, weights, len(dataset.classes))
    prep = Preprocessing.for_model(model, config.model_name, dataset.classes, channels, native_size)
    data = prepare_data(dataset, prep, workers=config.decode_workers, cache_root=_cache_root())
    if data.rejected:  # as rank 0 does: the resume key is computed from the same images
        dataset = dataset.without(data.rejected)
    _point_at_checkpoints(config, spec, dataset, prep)
    train(config, model, data)
    return BackendResult(
        route=route, run_id=None, summary=f"{route}: rank {distributed.rank()} trained alongside rank 0"
    )


def _cache_root() -> Path:
    return tracking.state_dir() / "cache" / "decoded"


def _point_at_checkpoints(config: TrainConfig, spec, dataset, prep: Preprocessing) -> None:
    """The run's resume key and checkpoint folder: every rank, and a re-run of the same task, find the same one."""
    config.resume_key = _resume_key(spec, dataset, prep, config)
    config.checkpoint_dir = tracking.state_dir() / "checkpoints" / spec.name / config.resume_key


def _resume_key(spec, dataset, prep: Preprocessing, config: TrainConfig) -> str:
    """Same spec, data, split, preprocessing, configuration and number of ranks: the same run, whose checkpoint
    may be resumed. The spec's `processes` (a run override on node 0 only) counts as the actual world size."""
    settings = {
        k: v for k, v in asdict(config).items() if k not in ("checkpoint_dir", "cache_dir", "resume_key")
    }
    task = spec.model_dump(mode="json")
    task["training"].pop("processes", None)
    blob = json.dumps(
        [task, cache_key(dataset, prep), prep.to_dict(), settings, distributed.world_size()],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
