"""One conformance suite for every registered backend, and the registry's behaviour."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_dataset
from visionroute.backends import Backend, BackendContext, BackendUnavailable, create_backend, list_backends
from visionroute.backends.base import BackendResult, register_backend

from visionroute import tracking
from visionroute.data.dataset import DatasetError
from visionroute.decision.rules import decide
from visionroute.planning import read_data
from visionroute.spec import Route, parse_spec


@pytest.mark.parametrize("name", list_backends())
def test_every_backend_implements_the_protocol(name):
    backend = create_backend(name)
    assert isinstance(backend, Backend)
    assert backend.name == name


def test_registry_holds_one_backend_per_route():
    assert list_backends() == sorted(route.value for route in Route)


def _conformance_task(name: str, tmp_path: Path) -> tuple:
    """A tiny task the backend `name` must run end to end: a decision forced to its route, its data."""
    root = make_dataset(tmp_path / "data", per_class=8)
    raw = {"name": f"conformance-{name.replace('_', '-')}", "route": name}
    if name == "vision_api":  # on premises: the local provider needs no credentials or network
        raw |= {"task": "tag", "constraints": {"external_api_allowed": False}}
        raw |= {"vision_api": {"input": str(root / "red")}}
    else:
        raw |= {"task": "classify", "data": {"path": str(root)}, "domain": "natural"}
        raw |= {"training": {"model": "tf_efficientnet_lite0", "epochs": 1, "budget_minutes": 1}}
    spec = parse_spec(raw)
    dataset, summary = read_data(spec)
    return spec, dataset, decide(spec, summary)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=[] if name == "vision_api" else [pytest.mark.slow])
        for name in list_backends()
    ],
)
def test_every_backend_runs_a_tiny_task_end_to_end(name, tmp_path):
    """Conformance: one nested MLflow run, closed FINISHED and tagged with its process; a result that names it;
    a training route registers a version whose promotion step finished."""
    spec, dataset, decision = _conformance_task(name, tmp_path)
    assert decision.route == name
    client = tracking.check_store()
    with tracking.run(client, spec.name, "parent", {}) as parent:
        progress = []
        context = BackendContext(spec, decision, dataset, parent, tmp_path / "work", progress.append)
        result = create_backend(name).run(context)
    assert isinstance(result, BackendResult) and result.route == name and result.summary
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["visionroute.pid"]
    assert progress and result.metrics
    if result.model_version:
        version = client.get_model_version(spec.name, result.model_version)
        # The promotion step finished: its outcome is recorded. A tiny test split is under the minimum a
        # champion may be chosen on, so the version stays challenger and says why.
        assert version.tags["visionroute.state"] == "ready" and version.tags["promoted"] in ("true", "false")
        assert version.tags["promotion_reason"]
        assert str(client.get_model_version_by_alias(spec.name, "challenger").version) == result.model_version


def test_unknown_backend_names_the_known_ones():
    with pytest.raises(ValueError, match="registered: finetune, scratch, vision_api"):
        create_backend("magic")


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        register_backend("finetune")(lambda: None)


def test_vision_api_without_images_says_what_to_set(tmp_path):
    spec = parse_spec({"name": "t", "task": "tag", "constraints": {"external_api_allowed": False}})
    context = BackendContext(spec, decide(spec), None, None, Path(tmp_path))
    with pytest.raises(DatasetError, match="set vision_api.input"):
        create_backend("vision_api").run(context)


@pytest.mark.parametrize("name", ["finetune", "scratch"])
def test_training_backends_refuse_tasks_they_cannot_train(name, tmp_path):
    spec = parse_spec({"name": "t", "task": "ocr", "data": {"labeled_examples": 500}, "route": name})
    context = BackendContext(spec, decide(spec), None, None, Path(tmp_path))
    with pytest.raises(BackendUnavailable, match="trains image classifiers"):
        create_backend(name).run(context)
