"""A training route as one tracked run: data, train, evaluate, log to MLflow, register. Used by the
finetune and scratch backends, which differ only in their weights and `TrainConfig`."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from visionroute import model_registry, tracking
from visionroute.backends.base import BackendContext, BackendResult, BackendUnavailable
from visionroute.data.dataset import DatasetError, assign_splits
from visionroute.training.catalogue import catalogue_entry, choose_model
from visionroute.training.engine import (
    Preprocessing,
    TrainConfig,
    build_model,
    pick_device,
    prepare_data,
    train,
)
from visionroute.training.metrics import plot_confusion_matrix
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
    if name == "auto":
        examples = len(context.dataset.samples) if context.dataset else 0
        on_gpu = pick_device().type == "cuda"
        name = choose_model(route, examples, spec.training.budget_minutes, gpu=on_gpu, hub=hub)
    catalogue_entry(name)  # a clear error for a name outside the catalogue
    return name


def run_training_route(
    context: BackendContext, route: str, config: TrainConfig, weights: PretrainedWeights | None
) -> BackendResult:
    spec = context.spec
    dataset = assign_splits(context.dataset, seed=config.seed)
    classes = dataset.classes
    client = tracking.configure()
    run_id = tracking.start_run(
        client,
        spec.name,
        f"{route}-{config.model_name}",
        {"visionroute.route": route, "visionroute.model": config.model_name},
        context.parent_run_id,
    )
    try:
        model = build_model(config.model_name, len(classes))
        if weights is not None:
            load_pretrained(model, weights, len(classes))
        prep = Preprocessing.for_model(model, config.model_name, classes)
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
                "classes": classes,
            },
        )
        tracking.log_json(client, run_id, dataset.split_manifest(), "data/split.json")

        data = prepare_data(dataset, prep, workers=config.decode_workers)
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

        config.checkpoint_dir = context.work_dir / "checkpoints"
        result = train(config, model, data, on_epoch=on_epoch)

        test = result.test
        summary = {f"test_{k}": test[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")}
        for name, scores in test["per_class"].items():
            summary[f"test_precision_{name}"] = scores["precision"]
            summary[f"test_recall_{name}"] = scores["recall"]
        summary.update(
            {
                "train_seconds": result.seconds,
                "train_images_per_s": result.train_images_per_s,
                "best_epoch": result.best_epoch,
                "epochs_run": len(result.history),
                "skipped_files": len(skipped),
            }
        )
        if result.probe:
            summary["probe_val_accuracy"] = result.probe["val_accuracy"]
        tracking.log_metrics(client, run_id, summary)
        client.set_tag(run_id, "visionroute.stopped", result.stopped)
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
            if champion_prep.input_size == prep.input_size and champion_prep.resize == prep.resize:
                return data.test_x, data.test_y
            samples = dataset.split("test")
            crops = [
                champion_prep.center_crop_uint8(champion_prep.resize_short(dataset.load(s))) for s in samples
            ]
            return torch.stack(crops), torch.tensor([s.label for s in samples])

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
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    text = (
        f"{route} {config.model_name}: test accuracy {test['accuracy']:.4f} on {test['examples']} images, "
        f"registered {spec.name} v{registration.version}"
        + (" as champion" if registration.promoted else " as challenger (champion kept)")
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
