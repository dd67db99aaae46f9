"""The gpu pool's Kubernetes base job template, rendered the way a Prefect worker renders it (no cluster)."""

from __future__ import annotations

import json

import yaml
from conftest import REPO
from prefect.utilities.templating import apply_values, find_placeholders

TEMPLATE = REPO / "deployments" / "kubernetes" / "gpu-base-job-template.json"


def render(**values) -> dict:
    template = json.loads(TEMPLATE.read_text())
    defaults = {name: spec.get("default") for name, spec in template["variables"]["properties"].items()}
    return apply_values(
        template["job_configuration"], {**defaults, "command": "prefect flow-run execute", **values}
    )


def test_every_placeholder_is_a_documented_variable():
    template = json.loads(TEMPLATE.read_text())
    properties = template["variables"]["properties"]
    used = {placeholder.name for placeholder in find_placeholders(template["job_configuration"])}
    assert used <= set(properties)
    assert [name for name, spec in properties.items() if not spec.get("description")] == []
    for name in ("image", "gpus", "node_selector", "tolerations", "mlflow_tracking_uri", "prefect_api_url"):
        assert name in used


def test_the_job_requests_gpus_on_gpu_nodes_and_reaches_both_servers():
    config = render(
        image="registry.local/visionroute:1.2",
        gpus=2,
        node_selector={"cloud.google.com/gke-accelerator": "nvidia-l4"},
        tolerations=[{"key": "gpu", "operator": "Equal", "value": "l4", "effect": "NoSchedule"}],
        mlflow_tracking_uri="http://mlflow:5000",
        prefect_api_url="http://prefect:4200/api",
        env={"VISIONROUTE_ALLOW_HUB": "1"},
    )
    pod = config["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "registry.local/visionroute:1.2"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 2
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert pod["tolerations"][0]["value"] == "l4"
    env = {item["name"]: item["value"] for item in container["env"]}
    assert (
        env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        and env["PREFECT_API_URL"] == "http://prefect:4200/api"
    )
    assert config["env"] == {"VISIONROUTE_ALLOW_HUB": "1"}  # the worker prepends these to the container's env
    assert config["job_manifest"]["metadata"]["namespace"] == "visionroute"
    # What the cluster receives is plain Kubernetes: no placeholder left anywhere.
    assert "{{" not in yaml.safe_dump(config["job_manifest"])


def test_defaults_alone_render_a_one_gpu_job():
    pod = render()["job_manifest"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


def test_the_prefect_server_accepts_it_as_a_kubernetes_pool_template():
    from prefect.server.schemas.actions import WorkPoolCreate

    template = json.loads(TEMPLATE.read_text())
    pool = WorkPoolCreate(name="gpu", type="kubernetes", base_job_template=template, concurrency_limit=1)
    assert pool.base_job_template["variables"]["properties"]["gpus"]["default"] == 1
