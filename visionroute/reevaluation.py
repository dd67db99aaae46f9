"""Re-score a champion on its saved test split and on labelled images added since it was trained.

The split a version was evaluated on is logged with its run (`data/split.json`), the data folder on its parent
run (`data/profile.json`): both are read back, so the figure is comparable with the one recorded at
registration. The outcome is a run in the task's experiment (metrics and `reevaluation.json`), so drift is a
metric you can plot over time in MLflow.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient

from visionroute import tracking
from visionroute.data.dataset import DatasetError, scan_dataset
from visionroute.data.images import ImageRejected
from visionroute.model_registry import CHAMPION, load_preprocessing
from visionroute.review import run_json
from visionroute.training.engine import evaluate


def champions(client: MlflowClient) -> list[str]:
    """Registered models that have a champion."""
    names = []
    for model in client.search_registered_models():
        if CHAMPION in (model.aliases or {}):
            names.append(model.name)
    return sorted(names)


def _stored(dataset, samples, prep) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The samples as the model's stored uint8 squares (as at registration), their labels, and how many
    could no longer be read."""
    stored, labels, unreadable = [], [], 0
    for sample in samples:
        try:
            stored.append(prep.to_stored(dataset.load(sample)))
            labels.append(sample.label)
        except (ImageRejected, OSError):
            unreadable += 1
    if not stored:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long), unreadable
    return torch.from_numpy(np.stack(stored)), torch.tensor(labels), unreadable


def reevaluate(client: MlflowClient, name: str, max_drop: float = 0.05) -> dict:
    """Score `name@champion` again; `dropped` is True when accuracy on its test split or on new labelled data
    falls more than `max_drop` below the accuracy recorded at registration."""
    version = client.get_model_version_by_alias(name, CHAMPION)
    run = client.get_run(version.run_id)
    parent = run.data.tags.get("mlflow.parentRunId")
    split = run_json(client, version.run_id, "data/split.json")
    profile = run_json(client, parent, "data/profile.json") if parent else None
    if not isinstance(split, dict) or not isinstance(profile, dict):
        raise DatasetError(f"{name} v{version.version} has no saved split or data profile to re-evaluate on")
    uri = f"models:/{name}/{version.version}"
    prep = load_preprocessing(uri)
    dataset = scan_dataset(Path(profile["source"]), split["classes"])
    by_ref = {sample.ref: sample for sample in dataset.samples}
    known = {row["ref"] for row in split["rows"]}
    test_refs = [row["ref"] for row in split["rows"] if row["split"] == "test"]
    test = [by_ref[ref] for ref in test_refs if ref in by_ref]
    new = [sample for sample in dataset.samples if sample.ref not in known]
    model = mlflow.pytorch.load_model(uri, map_location="cpu")
    recorded = float(version.tags.get("test_accuracy", "nan"))
    report = {
        "model": name,
        "version": str(version.version),
        "recorded_test_accuracy": recorded,
        "test_images": len(test),
        "test_images_missing": len(test_refs) - len(test),
        "new_images": len(new),
    }
    x, y, unreadable = _stored(dataset, test, prep)
    report["test_images_unreadable"] = unreadable
    if len(y):
        report["test_accuracy"] = evaluate(model, x, y, prep)["accuracy"]
        report["test_accuracy_drift"] = round(report["test_accuracy"] - recorded, 6)
    if new:
        x, y, _ = _stored(dataset, new, prep)
        if len(y):
            report["new_data_accuracy"] = evaluate(model, x, y, prep)["accuracy"]
            report["new_data_drift"] = round(report["new_data_accuracy"] - recorded, 6)
    drifts = [report[key] for key in ("test_accuracy_drift", "new_data_drift") if key in report]
    report["dropped"] = any(drift < -max_drop for drift in drifts)
    report["max_drop"] = max_drop
    run_id = tracking.start_run(
        client,
        name,
        f"reevaluate-v{version.version}",
        {
            "visionroute.reevaluated_version": version.version,
            "visionroute.dropped": str(report["dropped"]).lower(),
        },
    )
    tracking.log_metrics(
        client, run_id, {k: v for k, v in report.items() if k not in ("version", "max_drop")}
    )
    tracking.log_json(client, run_id, report, "reevaluation.json")
    client.set_terminated(run_id, "FINISHED")
    report["run_id"] = run_id
    return report
