"""MLflow tracking: where the store lives, one parent run per routed task, artifacts by explicit run id."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

STATE_ENV = "VISIONROUTE_STATE"


def state_dir() -> Path:
    """Project-local state (MLflow store, checkpoints): $VISIONROUTE_STATE or ./.state, always absolute."""
    path = Path(os.environ.get(STATE_ENV, ".state")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the MLflow server `visionroute up` runs on this state folder, else a SQLite
    file in the state folder as an absolute path (workers change dir)."""
    from visionroute.services import served_mlflow_url

    return (
        os.environ.get("MLFLOW_TRACKING_URI")
        or served_mlflow_url(state_dir())
        or f"sqlite:///{state_dir() / 'mlflow.db'}"
    )


def ui_url() -> str | None:
    """The MLflow UI's address when tracking goes to an MLflow server (http/https), else None."""
    uri = tracking_uri()
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else None


def configure() -> MlflowClient:
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client: MlflowClient, name: str) -> str:
    """The task's experiment, created with an absolute artifact folder (never relative to the cwd)."""
    experiment = client.get_experiment_by_name(name)
    if experiment:
        return experiment.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:"):
        location = (state_dir() / "artifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=location)


def start_run(
    client: MlflowClient, experiment: str, name: str, tags: dict, parent_run_id: str | None = None
) -> str:
    tags = {key: str(value) for key, value in tags.items() if value is not None}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return client.create_run(experiment_id(client, experiment), run_name=name, tags=tags).info.run_id


def log_text(client: MlflowClient, run_id: str, text: str, artifact_file: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / Path(artifact_file).name
        path.write_text(text)
        parent = str(Path(artifact_file).parent)
        client.log_artifact(run_id, str(path), None if parent == "." else parent)


def log_json(client: MlflowClient, run_id: str, data: object, artifact_file: str) -> None:
    log_text(client, run_id, json.dumps(data, indent=2, default=str), artifact_file)


def log_metrics(client: MlflowClient, run_id: str, metrics: dict, step: int | None = None) -> None:
    for key, value in metrics.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            client.log_metric(run_id, key, float(value), step=step or 0)


def log_params(client: MlflowClient, run_id: str, params: dict) -> None:
    for key, value in params.items():
        client.log_param(run_id, key, str(value)[:6000])


def run_url(run_id: str, experiment: str | None = None) -> str:
    return f"{tracking_uri()} run {run_id}" + (f" (experiment {experiment})" if experiment else "")
