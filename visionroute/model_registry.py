"""Log a trained model to MLflow, register it, and move `champion` only when it wins on the same test split.

A new version always gets alias `challenger`. `champion` moves to it when there is none yet, or when it beats
the current champion evaluated on this run's own test split (not on figures from another split) by more than
the champion's 95% interval there, and never on a test split under the policy's minimum size. The
comparison is written to the version's tags. A failure after the version is created deletes it: nothing is
left half-registered.

Order, so that a process killed at any point leaves something `repair` can finish or undo: compare with the
champion (before any version exists) -> create the version tagged `visionroute.state=registering` -> write the
comparison tags (`promoted` included) -> aliases -> `visionroute.state=ready`. Readers take aliases (set only at
the end) or ready versions; `repair_versions` deletes versions a dead process left before their aliases.
Registrations of one model are serialised by a file lock in the state folder (processes on this machine).
"""

from __future__ import annotations

import functools
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import timm
import torch
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from visionroute import review, tracking
from visionroute.decision.policy import DEFAULT_POLICY
from visionroute.training.engine import evaluate
from visionroute.training.metrics import format_accuracy
from visionroute.training.preprocessing import Preprocessing

CHAMPION, CHALLENGER = "champion", "challenger"
STATE_TAG, REGISTERING, READY = "visionroute.state", "registering", "ready"


@dataclass
class Registration:
    name: str
    version: str
    promoted: bool
    comparison: dict


def _pip_requirements() -> list[str]:
    return [
        f"torch=={torch.__version__.split('+')[0]}",
        f"timm=={timm.__version__}",
        f"mlflow=={mlflow.__version__}",
        "pillow",
        "numpy",
    ]


def log_model(run_id: str, model: torch.nn.Module, prep: Preprocessing) -> str:
    """Log the model with signature, input example, pinned requirements and its preprocessing; returns its URI."""
    model = model.cpu().eval()
    # Saved as pt2 (torch.export, MLflow's default: loading runs no pickled code). A batch of 2 in the
    # example keeps the batch dimension dynamic; with 1 the export specialises it to 1.
    example = np.zeros((2, prep.channels, prep.input_size, prep.input_size), dtype=np.float32)
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    with tempfile.TemporaryDirectory() as folder:
        prep_file = Path(folder) / "preprocessing.json"
        prep_file.write_text(json.dumps(prep.to_dict(), indent=2))
        # By explicit run and logged-model ids, not `mlflow.start_run(run_id=...)`: leaving that context would
        # mark the run FINISHED before registration, and a crash then would leave a finished run with a
        # half-registered version. The run's own lifecycle (tracking.run) closes it.
        experiment = MlflowClient().get_run(run_id).info.experiment_id
        logged = mlflow.initialize_logged_model(name="model", source_run_id=run_id, experiment_id=experiment)
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            model_id=logged.model_id,
            run_id=run_id,
            signature=infer_signature(example, output),
            input_example=example,
            pip_requirements=_pip_requirements(),
            extra_files=[str(prep_file)],
            metadata={"preprocessing": prep.to_dict()},
            serialization_format="pt2",
        )
    return info.model_uri


def load_preprocessing(model_uri: str) -> Preprocessing:
    """The preprocessing a registered model was trained with."""
    folder = mlflow.artifacts.download_artifacts(f"{model_uri}/extra_files/preprocessing.json")
    return Preprocessing.from_dict(json.loads(Path(folder).read_text()))


TestSet = Callable[[Preprocessing], tuple[torch.Tensor, torch.Tensor]]
"""Builds this run's test split (stored uint8 squares, labels) at a given model's preprocessing."""


def _champion_on_split(client: MlflowClient, name: str, classes: list[str], test_set: TestSet) -> dict | None:
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None
    uri = f"models:/{name}@{CHAMPION}"
    prep = load_preprocessing(uri)
    if prep.classes != classes:
        return {
            "version": champion.version,
            "comparable": False,
            "why": f"champion classes {prep.classes} differ from {classes}",
        }
    model = mlflow.pytorch.load_model(uri, map_location="cpu")
    test_x, test_y = test_set(prep)  # at the champion's own input size, which may differ
    metrics = evaluate(model, test_x, test_y, prep)
    return {
        "version": champion.version,
        "comparable": True,
        "accuracy": metrics["accuracy"],
        "accuracy_ci95": metrics["accuracy_ci95"],
        "macro_f1": metrics["macro_f1"],
    }


def promotion_verdict(test_metrics: dict, current: dict | None) -> tuple[bool, str]:
    """Whether the challenger becomes champion, and why. Never on a test split under the policy's minimum
    size; over a comparable champion only when its accuracy on the same split lies above the champion's 95%
    Wilson interval there: a difference within it is noise, and a tie keeps the champion."""
    per_class = {name: scores["support"] for name, scores in test_metrics["per_class"].items()}
    problem = DEFAULT_POLICY.test_split_problem(per_class)
    if problem:
        return False, f"not promoted: {problem}"
    if current is None:
        return True, "first version: no champion yet"
    if not current["comparable"]:
        return False, current["why"] + "; champion kept, promote by hand if intended"
    low, high = current["accuracy_ci95"]
    gain = test_metrics["accuracy"] - current["accuracy"]
    beyond = test_metrics["accuracy"] > high
    return beyond, (
        f"challenger accuracy {test_metrics['accuracy']:.4f} vs champion v{current['version']} "
        f"{current['accuracy']:.4f} on the same test split ({test_metrics['examples']} images): {gain:+.4f} is "
        + (
            f"beyond the champion's 95% interval {low:.4f}-{high:.4f}: promoted"
            if beyond
            else f"within the champion's 95% interval {low:.4f}-{high:.4f}, a tie: champion kept"
        )
    )


def _model_lock(name: str):
    """One registration (or repair) of a model at a time on this machine: two runs at once would otherwise
    each compare with the same champion and both promote."""
    return tracking.file_lock(tracking.state_dir() / "locks" / f"model-{name}.lock")


def _one_at_a_time(register: Callable[..., Registration]) -> Callable[..., Registration]:
    @functools.wraps(register)
    def locked(client: MlflowClient, name: str, *args, **kwargs) -> Registration:
        with _model_lock(name):
            return register(client, name, *args, **kwargs)

    return locked


@_one_at_a_time
def register_and_promote(
    client: MlflowClient,
    name: str,
    model_uri: str,
    run_id: str,
    test_metrics: dict,
    split_digest: str,
    classes: list[str],
    test_set: TestSet,
    tags: dict,
) -> Registration:
    """Register `model_uri` under `name`; alias challenger; champion if it beats the current one."""
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description=f"visionroute task {name}")
    current = _champion_on_split(client, name, classes, test_set)
    # An MLflow server (REST store) refuses a models:/m-... source unless model_id names that logged model.
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    version = client.create_model_version(
        name,
        model_uri,
        run_id=run_id,
        tags={**{k: str(v) for k, v in tags.items()}, STATE_TAG: REGISTERING},
        description=f"test accuracy {format_accuracy(test_metrics)} on split {split_digest}",
        model_id=model_id,
    )
    try:
        challenger = {
            "accuracy": test_metrics["accuracy"],
            "accuracy_ci95": test_metrics["accuracy_ci95"],
            "macro_f1": test_metrics["macro_f1"],
        }
        promoted, why = promotion_verdict(test_metrics, current)
        comparison = {
            "promoted": promoted,
            "why": why,
            "test_split": split_digest,
            "challenger": challenger,
            "champion": current,
        }
        version_tags = {
            "test_split_sha": split_digest,
            "test_accuracy": f"{challenger['accuracy']:.4f}",
            "test_accuracy_ci95": "{:.4f}-{:.4f}".format(*challenger["accuracy_ci95"]),
            "test_images": str(test_metrics["examples"]),
            "test_macro_f1": f"{challenger['macro_f1']:.4f}",
            "compared_with": f"v{current['version']}" if current else "none",
            "champion_test_accuracy": f"{current['accuracy']:.4f}"
            if current and current["comparable"]
            else "n/a",
            "promoted": str(promoted).lower(),
            "promotion_reason": why,
        }
        for key, value in version_tags.items():
            client.set_model_version_tag(name, version.version, key, value)
        client.set_registered_model_alias(name, CHALLENGER, version.version)
        if promoted:
            client.set_registered_model_alias(name, CHAMPION, version.version)
        # What a reviewer reads: version and model descriptions, and the alias history (visionroute.review).
        review.record_registration(client, name, str(version.version), comparison, tags)
        client.set_model_version_tag(name, version.version, STATE_TAG, READY)
    except BaseException:
        client.delete_model_version(name, version.version)
        raise
    return Registration(name, str(version.version), promoted, comparison)


def require_ready(client: MlflowClient, model_uri: str) -> None:
    """Refuse a registered version whose registration never finished (readers filter on visionroute.state)."""
    if not model_uri.startswith("models:/"):
        return
    name, _, ref = model_uri.removeprefix("models:/").partition("/")
    if "@" in name:
        return  # aliases are set only once a version is complete
    try:
        version = client.get_model_version(name, ref)
    except mlflow.exceptions.MlflowException:
        return  # loading reports the unknown name or version
    if version.tags.get(STATE_TAG, READY) != READY:
        raise ValueError(
            f"{model_uri} is half-registered ({STATE_TAG}={version.tags[STATE_TAG]}: the process registering it "
            f"did not finish); run `visionroute repair {name}`, or use models:/{name}@champion"
        )


def repair_versions(client: MlflowClient, name: str, is_live: Callable[[str], bool]) -> list[dict]:
    """Finish or undo the registrations of `name` that a dead process left half done.

    A version not `ready` whose run's owner is gone is deleted, unless `champion` already points at it (the
    last step before `ready`): then only its state tag was missing, and it is marked ready. `is_live(run_id)`
    says whether the version's run still belongs to a live process (its registration may be under way)."""
    repaired = []
    with _model_lock(name):
        try:
            champion = client.get_model_version_by_alias(name, CHAMPION).version
        except mlflow.exceptions.MlflowException:
            champion = None
        for version in client.search_model_versions(f"name = '{name}'"):
            if version.tags.get(STATE_TAG, READY) == READY or is_live(version.run_id):
                continue
            if str(version.version) == str(champion) and "promoted" in version.tags:
                client.set_model_version_tag(name, version.version, STATE_TAG, READY)
                repaired.append({"model": name, "version": version.version, "action": "marked ready"})
            else:
                client.delete_model_version(name, version.version)
                repaired.append({"model": name, "version": version.version, "action": "deleted"})
    return repaired
