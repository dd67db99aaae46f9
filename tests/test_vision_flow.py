"""The vision_api route end to end: the route-image-task flow (Prefect test harness) sends images through each
provider's real client library to its local fake, tracks the run in a real MLflow store, serves a re-run from
the cache, fit-tests a label map and escalates to training when the API misses its target."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import COLOURS, make_dataset, make_image, prefect_artifact, write_spec
from fakes.aws_fake import RekognitionFake
from fakes.azure_fake import AzureVisionFake
from fakes.behaviour import FakeBehaviour
from fakes.google_fake import GoogleGrpcFake, GoogleRestFake
from mlflow.tracking import MlflowClient
from visionroute.backends import BackendUnavailable
from visionroute.flows.route import route_image_task

from visionroute import tracking
from visionroute.cli import main
from visionroute.vision.base import ApiError

pytestmark = pytest.mark.flow


@pytest.fixture(autouse=True)
def on_prefect(prefect_harness):
    """Every test here runs its flows on the session's Prefect harness."""


def photos(folder: Path, count: int = 6) -> Path:
    colours = list(COLOURS.values())
    for index in range(count):
        make_image(folder / f"photo_{index}.jpg", colours[index % 3], seed=100 + index)
    return folder


def fake_for(provider: str, cloud_credentials: dict):
    behaviour = FakeBehaviour(max_batch=16 if provider.startswith("google") else 1)
    if provider == "google":
        return GoogleGrpcFake(behaviour)
    if provider == "google-rest":
        return GoogleRestFake(behaviour)
    if provider == "aws":
        return RekognitionFake(behaviour)
    return AzureVisionFake(behaviour, key=cloud_credentials["VISION_KEY"])


def tag_spec(tmp_path: Path, provider: str, endpoint: str | None, extra: str = "") -> Path:
    photos(tmp_path / "photos")
    name, transport = (provider, "grpc") if provider != "google-rest" else ("google", "rest")
    endpoint_line = f"  endpoint: {endpoint}\n" if endpoint else ""
    return write_spec(
        tmp_path / "tagging.yaml",
        f"""
name: photo-tagging
task: tag
data: {{path: ./photos}}
constraints: {{monthly_volume: 5000}}
vision_api:
  provider: {name}
  transport: {transport}
{endpoint_line}  output: ./out/tags.jsonl
{extra}""",
    )


def nested_run(client: MlflowClient, parent_run_id: str, name_prefix: str):
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return next(run for run in runs if run.info.run_name.startswith(name_prefix))


def stored_text(state: Path) -> str:
    """Everything visionroute wrote: the MLflow database and every artifact file, as text."""
    chunks = []
    for path in state.rglob("*"):
        if path.is_file() and "vision_cache" not in path.name:
            chunks.append(path.read_bytes().decode("latin-1"))
    return "\n".join(chunks)


@pytest.mark.parametrize("provider", ["google", "google-rest", "aws", "azure", "local"])
def test_each_provider_runs_the_route_end_to_end(
    provider, tmp_path, cloud_credentials, isolated_state, caplog, capsys
):
    caplog.set_level(logging.DEBUG)
    fake = None if provider == "local" else fake_for(provider, cloud_credentials).start()
    try:
        spec = tag_spec(tmp_path, provider, fake.endpoint if fake else None)
        outcome = route_image_task(str(spec))
    finally:
        if fake:
            fake.stop()
    name = "google" if provider == "google-rest" else provider
    assert outcome["decision"]["route"] == "vision_api" and outcome["decision"]["provider"] == name
    client = MlflowClient(tracking.tracking_uri())
    parent = client.get_run(outcome["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["visionroute.provider"] == name

    run = nested_run(client, parent.info.run_id, "vision-api")
    metrics = run.data.metrics
    assert metrics["answered"] == 6 and metrics["errors"] == 0 and metrics["cache_hits"] == 0
    assert metrics["billed_units"] == (0 if name == "local" else 6) and metrics["images_per_s"] > 0
    assert {"latency_p50_s", "latency_p95_s", "estimated_cost_usd"} <= set(metrics)
    assert run.data.params["provider"] == name
    assert (metrics["estimated_cost_usd"] == 0) == (name == "local")

    rows = [json.loads(line) for line in (tmp_path / "out" / "tags.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(row["labels"] and row["sha256"] and row["error"] is None for row in rows)
    if name != "local":  # the fakes answer with the photo's dominant colour
        assert {row["labels"][0]["name"] for row in rows} == {"Red", "Green", "Blue"}
    assert "results.jsonl" in {item.path for item in client.list_artifacts(run.info.run_id)}
    assert prefect_artifact("photo-tagging-progress")
    table = prefect_artifact("photo-tagging-result")[0]
    assert "billed_units" in str(table.data) and "answered" in table.description

    # No credential reaches the logs, the MLflow store or the artifacts.
    written = stored_text(isolated_state) + caplog.text + "".join(capsys.readouterr())
    for secret in cloud_credentials.values():
        assert secret not in written


def test_a_rerun_is_served_from_the_cache(tmp_path, cloud_credentials):
    with RekognitionFake(FakeBehaviour(max_batch=1)) as fake:
        spec = tag_spec(tmp_path, "aws", fake.endpoint)
        route_image_task(str(spec))
        sent = fake.behaviour.requests
        outcome = route_image_task(str(spec))
        assert fake.behaviour.requests == sent  # no new billable call
    metrics = outcome["result"]["metrics"]
    assert metrics["cache_hits"] == 6 and metrics["billed_units"] == 0 and metrics["estimated_cost_usd"] == 0
    assert "6 from cache" in outcome["result"]["summary"]


def test_a_missing_credential_fails_the_run_naming_what_to_set(tmp_path, cloud_credentials, monkeypatch):
    monkeypatch.delenv("VISION_KEY")
    spec = tag_spec(tmp_path, "azure", "http://127.0.0.1:9")
    with pytest.raises(BackendUnavailable, match="VISION_KEY"):
        route_image_task(str(spec))
    client = MlflowClient(tracking.tracking_uri())
    runs = client.search_runs([client.get_experiment_by_name("photo-tagging").experiment_id])
    assert {run.info.status for run in runs} == {"FAILED"}


def test_every_image_refused_fails_the_run_and_keeps_the_errors(tmp_path, cloud_credentials):
    behaviour = FakeBehaviour(max_batch=1)
    with RekognitionFake(behaviour) as fake:
        behaviour.fail_next(100, "forbidden")
        spec = tag_spec(tmp_path, "aws", fake.endpoint)
        with pytest.raises(BackendUnavailable, match=r"forbidden x6"):
            route_image_task(str(spec))
        assert behaviour.requests == 1  # 403 is never retried, and the rest are not sent to be refused too


def label_map_spec(tmp_path: Path, endpoint: str, label_map: str, target: float) -> Path:
    make_dataset(tmp_path / "data", per_class=10)
    return write_spec(
        tmp_path / "colours.yaml",
        f"""
name: colours-by-api
task: classify
data: {{path: ./data}}
domain: natural
constraints: {{monthly_volume: 2000}}
training: {{model: tf_efficientnet_lite0, epochs: 1, budget_minutes: 2}}
vision_api:
  provider: aws
  endpoint: {endpoint}
  label_map: {label_map}
  target_accuracy: {target}
  fit_sample: 8
""",
    )


def test_a_label_map_that_fits_keeps_the_api_route(tmp_path, cloud_credentials):
    with RekognitionFake(FakeBehaviour(max_batch=1)) as fake:
        spec = label_map_spec(tmp_path, fake.endpoint, "{red: [Red], blue: [Blue]}", 0.9)
        outcome = route_image_task(str(spec))
    assert outcome["decision"]["route"] == "vision_api"
    assert outcome["decision"]["rule"] == "specific-label-map-api"
    assert outcome["result"]["metrics"]["accuracy"] == 1.0
    client = MlflowClient(tracking.tracking_uri())
    fit = nested_run(client, outcome["parent_run_id"], "fit-test")
    assert fit.data.metrics["fit_accuracy"] == 1.0 and fit.data.params["sample"] == "8"
    assert prefect_artifact("colours-by-api-fit-test")


def test_a_fit_test_that_cannot_reach_the_api_fails_instead_of_escalating(tmp_path, cloud_credentials):
    behaviour = FakeBehaviour(max_batch=1)
    with RekognitionFake(behaviour) as fake:
        behaviour.fail_next(100, "forbidden")
        spec = label_map_spec(tmp_path, fake.endpoint, "{red: [Red], blue: [Blue]}", 0.9)
        with pytest.raises(ApiError, match=r"could not measure aws: 8 of 8 images failed \(forbidden x8"):
            route_image_task(str(spec))
    client = MlflowClient(tracking.tracking_uri())
    runs = client.search_runs([client.get_experiment_by_name("colours-by-api").experiment_id])
    parent = next(run for run in runs if "mlflow.parentRunId" not in run.data.tags)
    assert parent.info.status == "FAILED" and parent.data.tags["visionroute.route"] == "vision_api"
    assert "visionroute.escalated_from" not in parent.data.tags


@pytest.mark.slow
def test_an_api_that_misses_the_target_escalates_to_finetune(tmp_path, cloud_credentials):
    with RekognitionFake(FakeBehaviour(max_batch=1)) as fake:
        # The map is wrong on purpose: the API's "Red" is mapped to blue.
        spec = label_map_spec(tmp_path, fake.endpoint, "{red: [Blue], blue: [Red]}", 0.8)
        outcome = route_image_task(str(spec))
    decision = outcome["decision"]
    assert decision["route"] == "finetune" and decision["rule"] == "escalated-finetune"
    assert decision["auto_rule"] == "specific-imagenet-like-finetune"
    assert decision["escalation"]["fit_accuracy"] == 0.0 and decision["escalation"]["target_accuracy"] == 0.8
    assert "below target_accuracy 0.8; escalated to finetune" in decision["reasons"][0]
    client = MlflowClient(tracking.tracking_uri())
    parent = client.get_run(outcome["parent_run_id"])
    assert parent.data.tags["visionroute.route"] == "finetune"
    assert parent.data.tags["visionroute.escalated_from"] == "vision_api"
    recorded = json.loads(Path(client.download_artifacts(parent.info.run_id, "decision.json")).read_text())
    assert recorded["escalation"]["provider"] == "aws"
    assert outcome["result"]["model_version"]  # the trained model is registered


def test_fit_test_command_reports_accuracy_per_class(tmp_path, cloud_credentials, capsys):
    with RekognitionFake(FakeBehaviour(max_batch=1)) as fake:
        spec = label_map_spec(tmp_path, fake.endpoint, "{red: [Red], blue: [Purple]}", 0.9)
        assert main(["fit-test", str(spec), "--provider", "aws", "--sample", "6"]) == 0
        assert fake.behaviour.requests == 6
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert report["images"] == 6 and report["accuracy"] == 0.5
    assert report["per_class"]["red"]["accuracy"] == 1.0 and report["per_class"]["blue"]["accuracy"] == 0.0
    assert report["unmapped"] == 3 and report["run_id"]
    assert "misses target 0.9" in out.err
