"""MLflow tracking: where the store lives, one run lifecycle for every run visionroute opens, artifacts by
explicit run id."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from visionroute.processes import start_time

logger = logging.getLogger(__name__)

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


class StoreError(RuntimeError):
    """The MLflow store cannot be used; the message names the URI and what to do."""


def _state_path() -> Path:
    return Path(os.environ.get(STATE_ENV, ".state")).resolve()


def check_store(timeout_s: float = 10.0) -> MlflowClient:
    """Make sure the tracking store answers before any work is done (seconds, not MLflow's minutes of retries).

    A local SQLite store is created or migrated under a file lock, so that two first runs at once do not both
    migrate it. Raises StoreError naming the URI and the fix."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{_state_path() / 'mlflow.db'}"
    hint = (
        "point MLFLOW_TRACKING_URI at a running store, or unset it to use the local one in "
        f"{_state_path()} (VISIONROUTE_STATE moves it)"
    )
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
                response.read()
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise StoreError(
                f"the MLflow tracking server {uri} does not answer ({reason}); start it "
                f"(`mlflow server --port ...`) or {hint}"
            ) from None
        return configure()
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///"))
        try:
            database.parent.mkdir(parents=True, exist_ok=True)
            # SQLite writes a journal beside the database: the folder must be writable, not just the file.
            probe = database.parent / f".write-probe-{os.getpid()}"
            probe.touch()
            probe.unlink()
            if database.exists():
                with database.open("r+b"):
                    pass
        except OSError as error:
            raise StoreError(
                f"the MLflow store {database} cannot be written ({error.strerror or error}): make "
                f"{database.parent} writable, set VISIONROUTE_STATE to a writable folder, or "
                "set MLFLOW_TRACKING_URI to another store"
            ) from None
        with file_lock(database.with_name(database.name + ".lock")):
            return _probe(uri, hint)
    return _probe(uri, hint)


def _probe(uri: str, hint: str) -> MlflowClient:
    client = configure()
    try:
        # Both stores: creating them creates and migrates the schema.
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)
    except Exception as error:
        raise StoreError(f"the MLflow store {uri} cannot be used ({error}); {hint}") from None
    return client


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes on this machine (released by the OS if the holder dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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


def process_identity() -> dict[str, str]:
    """Tags that tell a later process whether this run's owner still lives: host, pid and the pid's start
    time (a pid is reused after its process dies; the pair is not)."""
    return {
        "visionroute.host": socket.gethostname(),
        "visionroute.pid": str(os.getpid()),
        "visionroute.pid_started": str(start_time(os.getpid()) or "unknown"),
    }


def start_run(
    client: MlflowClient, experiment: str, name: str, tags: dict, parent_run_id: str | None = None
) -> str:
    tags = {key: str(value) for key, value in tags.items() if value is not None}
    tags.update(process_identity())
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return client.create_run(experiment_id(client, experiment), run_name=name, tags=tags).info.run_id


ERROR_TAG = "visionroute.error"
KILLED_TAG = "visionroute.killed"


def owner_alive(tags: dict) -> bool | None:
    """Whether the process that opened a run (its process-identity tags) still runs: None when this machine
    cannot tell (another host, or a run opened before the tags existed)."""
    host, pid, started = (tags.get(f"visionroute.{key}") for key in ("host", "pid", "pid_started"))
    if not pid or host != socket.gethostname():
        return None
    now = start_time(int(pid))
    return now is not None and (started in (None, "unknown") or str(now) == started)


def abandoned_runs(client: MlflowClient, experiment_ids: list[str], also: str = "") -> list:
    """RUNNING runs (matching the filter `also`, when given) whose process is gone: killed outright, their own
    lifecycle could not close them."""
    query = "attributes.status = 'RUNNING'" + (f" and {also}" if also else "")
    return [
        run
        for run in client.search_runs(experiment_ids, query, max_results=1000)
        if owner_alive(run.data.tags) is False
    ]


def repair_runs(client: MlflowClient, experiments: list[str]) -> list[dict]:
    """Mark KILLED, with a tag saying so, every RUNNING run in `experiments` whose process is gone (killed
    outright, so its own lifecycle could not close it)."""
    ids = [e.experiment_id for name in experiments if (e := client.get_experiment_by_name(name))]
    if not ids:
        return []
    repaired = []
    for stale in abandoned_runs(client, ids):
        tags = stale.data.tags
        why = (
            f"process {tags['visionroute.pid']} on {tags['visionroute.host']} ended without closing this run "
            "(killed); marked KILLED by visionroute repair"
        )
        client.set_tag(stale.info.run_id, KILLED_TAG, why)
        client.set_terminated(stale.info.run_id, "KILLED")
        repaired.append(
            {
                "run": stale.info.run_id,
                "name": stale.info.run_name,
                "action": "marked KILLED",
                "prefect_flow_run_id": tags.get("prefect.flow_run_id"),
            }
        )
    return repaired


def run_is_live(client: MlflowClient, run_id: str | None) -> bool:
    """The run is RUNNING and its process lives (or cannot be checked from here): leave its work alone."""
    if not run_id:
        return False
    info = client.get_run(run_id)
    return info.info.status == "RUNNING" and owner_alive(info.data.tags) is not False


@contextmanager
def run(
    client: MlflowClient, experiment: str, name: str, tags: dict, parent_run_id: str | None = None
) -> Iterator[str]:
    """One MLflow run's whole life: created with its owner's process identity, FINISHED when the block ends,
    FAILED with the error as the `visionroute.error` tag when anything escapes it (interrupts included).
    A process killed outright cannot run this; `repair` closes its runs later."""
    run_id = start_run(client, experiment, name, tags, parent_run_id)
    try:
        yield run_id
    except BaseException as error:
        mark_failed(client, run_id, error)  # first: the children's search may wait on an unreachable store
        fail_orphaned_children(client, run_id, error)
        raise
    client.set_terminated(run_id, "FINISHED")


def fail_orphaned_children(client: MlflowClient, run_id: str, error: BaseException) -> None:
    """Close FAILED, with the parent's error, the child runs still RUNNING whose process is gone: a training
    rank that torchrun had to kill (blocked in a collective with a dead peer, it never saw its SIGTERM) could
    not close its own run."""
    try:
        experiment = client.get_run(run_id).info.experiment_id
        orphans = abandoned_runs(client, [experiment], f"tags.mlflow.parentRunId = '{run_id}'")
    except Exception as second:  # the original error is the one to report
        logger.warning("could not look for the child runs of MLflow run %s: %s", run_id, second)
        return
    for orphan in orphans:
        mark_failed(client, orphan.info.run_id, error)


def mark_failed(client: MlflowClient, run_id: str, error: BaseException) -> None:
    """Close a run as FAILED with the error; a store that fails here too must not hide the first error."""
    message = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    try:
        client.set_tag(run_id, ERROR_TAG, message[:5000])
        client.set_terminated(run_id, "FAILED")
    except Exception as second:  # the original error is the one to report
        logger.warning("could not mark MLflow run %s FAILED: %s", run_id, second)


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
