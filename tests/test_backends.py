"""One conformance suite for every registered backend, and the registry's behaviour."""

from __future__ import annotations

from pathlib import Path

import pytest
from visionroute.backends import Backend, BackendContext, BackendUnavailable, create_backend, list_backends
from visionroute.backends.base import register_backend

from visionroute.data.dataset import DatasetError
from visionroute.decision.rules import decide
from visionroute.spec import parse_spec


@pytest.mark.parametrize("name", list_backends())
def test_every_backend_implements_the_protocol(name):
    backend = create_backend(name)
    assert isinstance(backend, Backend)
    assert backend.name == name


def test_registry_holds_one_backend_per_route():
    assert list_backends() == ["finetune", "scratch", "vision_api"]


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
