"""The run forms the Prefect UI renders: every field explained, no union of models, and either source works."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO
from prefect.utilities.callables import parameter_schema

from visionroute.forms import RunOverrides, TaskForm, resolve_spec
from visionroute.spec import SpecError, load_spec

DEPLOYMENTS = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["deployments"]


def deployed_flows():
    """Every flow a deployment in deployments/prefect.yaml runs: the forms a person fills in the UI."""
    import importlib

    found = {}
    for deployment in DEPLOYMENTS:
        path, name = deployment["entrypoint"].split(":")
        module = importlib.import_module(f"visionroute.flows.{Path(path).stem}")
        flow = getattr(module, name)
        found[flow.name] = flow
    return found


def undescribed(schema: dict) -> list[str]:
    missing = [
        f"parameter {name}" for name, field in schema["properties"].items() if not field.get("description")
    ]
    for model, definition in schema.get("definitions", schema.get("$defs", {})).items():
        for name, field in definition.get("properties", {}).items():
            if not field.get("description"):
                missing.append(f"{model}.{name}")
    return missing


def test_every_flow_parameter_and_form_field_has_a_description():
    flows = deployed_flows()
    assert set(flows) == {"route-image-task", "predict", "review-model", "reevaluate-champions"}
    for name, flow in flows.items():
        schema = parameter_schema(flow.fn).model_dump_for_openapi()
        assert undescribed(schema) == [], name


def test_each_example_task_has_a_deployment_and_scratch_runs_on_the_gpu_pool():
    specs = {d["parameters"]["spec_path"] for d in DEPLOYMENTS if "spec_path" in d.get("parameters", {})}
    assert specs == {f"examples/tasks/{p.name}" for p in (REPO / "examples" / "tasks").glob("*.yaml")}
    by_name = {d["name"]: d for d in DEPLOYMENTS}
    assert by_name["train-scratch-gpu"]["work_pool"]["name"] == "gpu"
    assert by_name["train-scratch-gpu"]["parameters"] == {"overrides": {"route": "scratch"}}
    assert by_name["reevaluate-champions-nightly"]["schedules"][0]["cron"] == "0 2 * * *"
    for flows_file in (REPO / "flows").glob("*.py"):  # flows/ holds flows only
        assert flows_file.stem == "__init__" or "@flow" in flows_file.read_text(), flows_file


def test_forms_use_drop_downs_and_no_union_of_models():
    schema = parameter_schema(deployed_flows()["route-image-task"].fn).model_dump_for_openapi()
    definitions = schema["definitions"]
    assert definitions["Task"]["enum"] == ["classify", "tag", "ocr", "detect_objects", "detect_faces"]
    assert "scratch" in definitions["RunOverrides"]["properties"]["route"]["enum"]
    for definition in definitions.values():
        for field in definition.get("properties", {}).values():
            refs = [option for option in field.get("anyOf", []) if "$ref" in option]
            assert len(refs) <= 1 and not (refs and any(o.get("type") == "null" for o in field["anyOf"]))


def test_a_spec_file_is_routed_as_it_is_and_overrides_make_a_new_one(tmp_path):
    spec = REPO / "examples" / "tasks" / "ants-vs-bees.yaml"
    same = resolve_spec("examples/tasks/ants-vs-bees.yaml", TaskForm(), RunOverrides(), tmp_path, REPO)
    assert same == spec
    quick = resolve_spec(
        str(spec), TaskForm(), RunOverrides(budget_minutes=1, route="scratch"), tmp_path, REPO
    )
    loaded = load_spec(quick)
    assert (loaded.training.budget_minutes, loaded.route, loaded.training.epochs) == (1, "scratch", 5)
    assert loaded.data.path == (REPO / "examples" / "data" / "ants_bees").resolve()


def test_the_form_becomes_a_strict_spec(tmp_path):
    form = TaskForm(
        name="form-task", task="tag", external_api_allowed=False, data_path="examples/data/ants_bees/val/bees"
    )
    path = resolve_spec("", form, RunOverrides(), tmp_path / "specs", REPO)
    assert path.parent == tmp_path / "specs" and "Written by the route-image-task flow" in path.read_text()
    spec = load_spec(path)
    assert spec.task == "tag" and not spec.constraints.external_api_allowed
    assert spec.data.path == REPO / "examples" / "data" / "ants_bees" / "val" / "bees"
    assert yaml.safe_load(path.read_text())["name"] == "form-task"


@pytest.mark.parametrize(
    ("spec_path", "form", "message"),
    [
        ("", TaskForm(), "nothing to route"),
        ("examples/tasks/ants-vs-bees.yaml", TaskForm(name="also"), "not both"),
        ("", TaskForm(name="bad", task="ocr", classes=["a", "b"]), "task form: invalid task spec"),
    ],
)
def test_form_mistakes_name_the_fix(tmp_path, spec_path, form, message):
    with pytest.raises(SpecError, match=message):
        resolve_spec(spec_path, form, RunOverrides(), tmp_path, Path(REPO))
