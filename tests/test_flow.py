"""The route-image-task flow end to end: real Prefect (test harness), real MLflow store (SQLite in tmp)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import COLOURS, make_dataset, make_image, prefect_artifact, write_spec
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image
from visionroute.flows.route import route_image_task

from visionroute import tracking
from visionroute.cli import main
from visionroute.data.dataset import DatasetError
from visionroute.training.engine import build_model
from visionroute.training.weights import load_pretrained, resolve_pretrained

pytestmark = pytest.mark.flow


@pytest.fixture(autouse=True)
def on_prefect(prefect_harness):
    """Every test here runs its flows on the session's Prefect harness."""


@pytest.fixture
def task_spec(tmp_path):
    # A given test split of 15 images per class (the minimum a champion can be chosen on is 30 and 5 per class),
    # plus a copy of a training image: leakage, reported and kept by default.
    root = make_dataset(tmp_path / "data", per_class=10, splits=("train",))
    for name in ("red", "blue"):
        for index in range(15):
            make_image(root / "test" / name / f"{name}_{index}.jpg", COLOURS[name], 1000 + index)
    (root / "test" / "red" / "leaked.jpg").write_bytes((root / "train" / "red" / "red_0.jpg").read_bytes())
    (root / "train" / "red" / "readme.txt").write_text("not an image")
    whole = make_image(tmp_path / "whole.jpg", (200, 0, 0), 99, size=(256, 256))
    (root / "train" / "red" / "cut.jpg").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return write_spec(
        tmp_path / "colours.yaml",
        """
name: colours
task: classify
data: {path: ./data}
domain: natural
constraints: {monthly_volume: 1000}
training: {model: tf_efficientnet_lite0, epochs: 1, budget_minutes: 2}
""",
    )


def artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    return {item.path for item in client.list_artifacts(run_id, path)}


@pytest.mark.slow
def test_route_trains_tracks_registers_and_promotes(task_spec, tmp_path):
    outcome = route_image_task(str(task_spec))
    client = MlflowClient(tracking.tracking_uri())
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'state' / 'mlflow.db'}"

    # Parent run: tagged, decision and spec attached.
    parent = client.get_run(outcome["parent_run_id"])
    assert parent.info.status == "FINISHED"
    tags = parent.data.tags
    assert tags["visionroute.route"] == "finetune"
    assert tags["visionroute.rule"] == "specific-imagenet-like-finetune"
    assert len(tags["visionroute.spec_hash"]) == 16 and tags["prefect.flow_run_id"]
    assert {"decision.json", "decision.md", "spec", "data", "result.json"} <= artifacts(
        client, parent.info.run_id
    )
    decision = json.loads(Path(client.download_artifacts(parent.info.run_id, "decision.json")).read_text())
    assert (
        decision["route"] == "finetune" and decision["costs"]["finetune"]["model"] == "tf_efficientnet_lite0"
    )
    # The domain is measured on every specific task with data; colour fields need no ImageNet features, so the
    # measurement contradicts the declared 'natural' and says so, while the declared domain still decides.
    assert decision["inputs"]["domain_measurement"]["images"] > 0
    assert any("declared domain 'natural'" in warning for warning in decision["warnings"])

    # Nested training run: metrics, pictures, skipped files with reasons.
    result = outcome["result"]
    child = client.get_run(result["run_id"])
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    metrics = child.data.metrics
    assert metrics["test_accuracy"] == 1.0
    for key in (
        "test_balanced_accuracy",
        "test_macro_f1",
        "test_precision_red",
        "test_recall_blue",
        "val_accuracy",
    ):
        assert key in metrics
    assert {"evaluation/confusion_matrix.png", "evaluation/metrics.json"} <= artifacts(
        client, child.info.run_id, "evaluation"
    )
    skipped = json.loads(Path(client.download_artifacts(child.info.run_id, "data/skipped.json")).read_text())
    reasons = {row["path"].split("/")[-1]: row["reason"] for row in skipped}
    assert reasons == {"readme.txt": "not an image file type (.txt)", "cut.jpg": "truncated file"}

    # Registry: first version is champion and challenger, with the comparison in its tags.
    version = client.get_model_version_by_alias("colours", "champion")
    assert str(version.version) == result["model_version"] == "1"
    assert str(client.get_model_version_by_alias("colours", "challenger").version) == "1"
    assert version.tags["promoted"] == "true" and version.tags["compared_with"] == "none"
    assert version.tags["test_split_sha"]

    # Prefect UI: decision as markdown, costs as a table, a finished progress artifact.
    assert "route `finetune`" in prefect_artifact("colours-decision")[0].data
    assert {row["route"] for row in json.loads(prefect_artifact("colours-route-costs")[0].data)} == {
        "vision_api",
        "finetune",
        "scratch",
    }
    assert prefect_artifact("colours-progress")[0].data == 100.0
    metrics_table = json.loads(prefect_artifact("colours-result")[0].data)
    assert {"test_accuracy", "test_macro_f1", "test_accuracy_ci95_low", "test_accuracy_ci95_high"} <= {
        row["metric"] for row in metrics_table
    }
    # The interval is wherever the test accuracy is: the run's metrics, the summary, the registry version.
    assert (metrics["test_accuracy_ci95_low"], metrics["test_accuracy_ci95_high"]) == (0.8897, 1.0)
    assert "test accuracy 1.0000 (95% CI 0.89-1.00, 31 images)" in result["summary"]
    assert version.tags["test_accuracy_ci95"] == "0.8897-1.0000" and version.tags["test_images"] == "31"
    assert version.description.startswith("test accuracy 1.0000 (95% CI 0.89-1.00, 31 images)")
    # The leaked test image stays in the given split; the accuracy without it is the second figure.
    assert metrics["test_leaked_images"] == 1 and metrics["test_accuracy_without_leaked"] == 1.0
    assert "(1.0000 on the 30 test images without a copy in train/val)" in result["summary"]
    assert tags["visionroute.leakage"] == "reported" and parent.data.metrics["leaked_test_images"] == 1
    assert "1 test image(s) with a copy in train/val kept" in decision["evaluation"]["leakage_handling"]

    # A second, identical run must beat the champion on the same test split to take the alias: it cannot.
    again = route_image_task(str(task_spec))["result"]
    assert again["model_version"] == "2" and not again["promoted"]
    second = client.get_model_version("colours", "2")
    assert second.tags["compared_with"] == "v1" and second.tags["champion_test_accuracy"] == "1.0000"
    assert "a tie: champion kept" in second.tags["promotion_reason"]
    assert second.tags["test_split_sha"] == version.tags["test_split_sha"]
    assert str(client.get_model_version_by_alias("colours", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("colours", "challenger").version) == "2"

    # predict labels new images with the champion and lists what it could not read.
    out = tmp_path / "preds.jsonl"
    (tmp_path / "new").mkdir()
    make_image(tmp_path / "new" / "b.jpg", (40, 60, 200), 1234)
    (tmp_path / "new" / "broken.png").write_bytes(b"nope")
    for index in range(3):  # a batch of several: the exported model's batch dimension is dynamic
        make_image(tmp_path / "new" / f"r{index}.jpg", (200, 40, 40), 500 + index)
    assert (
        main(["predict", "--model", "models:/colours@champion", str(tmp_path / "new"), "--out", str(out)])
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["label"] == "blue" and rows[0]["score"] > 0.5 and len(rows[0]["sha256"]) == 64
    assert rows[1]["path"].endswith("broken.png") and "not an image" in rows[1]["error"]
    assert [row["label"] for row in rows[2:]] == ["red", "red", "red"]

    # The champion can seed another training as its pretrained weights (training.checkpoint: models:/...).
    model = build_model("tf_efficientnet_lite0", 2)
    weights = resolve_pretrained("tf_efficientnet_lite0", model, "models:/colours@champion")
    assert weights.source == "mlflow:models:/colours@champion"
    load_pretrained(model, weights, 2)


def test_a_route_that_cannot_run_fails_clearly_and_leaves_a_failed_parent_run(tmp_path, capsys):
    # Decided (local tagging), but the spec names no images to tag.
    spec = write_spec(
        tmp_path / "tags.yaml", "name: private-tags\ntask: tag\nconstraints: {external_api_allowed: false}\n"
    )
    with pytest.raises(DatasetError, match="set vision_api.input"):
        route_image_task(str(spec))
    client = MlflowClient(tracking.tracking_uri())
    runs = client.search_runs([client.get_experiment_by_name("private-tags").experiment_id])
    assert [run.info.status for run in runs] == ["FAILED"]
    assert "needs images" in runs[0].data.tags["visionroute.error"]
    assert "decision.json" in artifacts(client, runs[0].info.run_id)

    assert main(["run", str(spec)]) == 2
    assert "set vision_api.input" in capsys.readouterr().err


@pytest.mark.slow
def test_scratch_on_grey_28px_data_trains_natively_and_registers_a_champion(tmp_path):
    from conftest import grey_npz

    from visionroute.model_registry import load_preprocessing

    grey_npz(tmp_path / "returns.npz", count=90)  # 30 test images: the minimum to choose a champion
    spec = write_spec(
        tmp_path / "radar.yaml",
        """
name: radar-returns
task: classify
classes: [clutter, target]
data: {path: ./returns.npz}
domain: radar
route: scratch
constraints: {external_api_allowed: false}
training: {epochs: 2, budget_minutes: 2}
""",
    )
    outcome = route_image_task(str(spec))
    decision, result = outcome["decision"], outcome["result"]
    assert decision["route"] == "scratch" and decision["model"] == "resnet18_small"
    client = MlflowClient(tracking.tracking_uri())
    child = client.get_run(result["run_id"])
    assert child.data.params["model"] == "resnet18_small"  # the model the decision named is the one trained
    assert child.data.params["channels"] == "1" and child.data.params["input_size"] == "28"
    assert child.data.params["stored_size"] == "28"
    assert "test_auc" in child.data.metrics and "decision_threshold" in child.data.metrics
    assert child.data.tags["visionroute.decoded_cache"].startswith("built")
    assert str(client.get_model_version_by_alias("radar-returns", "champion").version) == "1"
    # Registered: the crash-recovery checkpoints are gone, so a later run of the task trains afresh.
    assert not list((tracking.state_dir() / "checkpoints" / "radar-returns").glob("*/last.pt"))
    prep = load_preprocessing("models:/radar-returns@champion")
    assert (prep.channels, prep.input_size, prep.classes) == (1, 28, ["clutter", "target"])

    # The registered model takes grey 28 px images as they come, through predict.
    (tmp_path / "new").mkdir()
    blob = np.full((28, 28), 30, dtype=np.uint8)
    blob[8:20, 8:20] = 200
    Image.fromarray(blob).save(tmp_path / "new" / "t.png")
    out = tmp_path / "preds.jsonl"
    assert (
        main(
            ["predict", "--model", "models:/radar-returns@champion", str(tmp_path / "new"), "--out", str(out)]
        )
        == 0
    )
    assert json.loads(out.read_text())["label"] in ("clutter", "target")

    # The same task again reuses the decoded cache and is compared with the champion on the same split.
    again = route_image_task(str(spec))["result"]
    assert client.get_run(again["run_id"]).data.tags["visionroute.decoded_cache"] == "reused"
    assert client.get_model_version("radar-returns", again["model_version"]).tags["compared_with"] == "v1"


@pytest.mark.slow
def test_bakeoff_trains_both_routes_on_one_split_and_the_better_is_champion(task_spec):
    from visionroute.flows.bakeoff import bakeoff

    outcome = bakeoff(str(task_spec), "finetune,scratch")
    rows = {row["route"]: row for row in outcome["rows"]}
    assert set(rows) == {"finetune", "scratch"} and outcome["framework_choice"] == "finetune"
    assert rows["finetune"]["framework_choice"] and not rows["scratch"]["framework_choice"]
    client = MlflowClient(tracking.tracking_uri())
    versions = client.search_model_versions("name='colours'")
    assert len(versions) == 2  # both registered
    champion = client.get_model_version_by_alias("colours", "champion")
    # The better is champion: the other route did not beat it by more than its 95% interval on this split.
    other = next(row for row in rows.values() if str(row["version"]) != str(champion.version))
    assert other["test_accuracy"] <= float(champion.tags["test_accuracy_ci95"].split("-")[1])
    for version in versions:  # every comparison recorded on the version
        assert version.tags["promoted"] in ("true", "false") and version.tags["test_split_sha"]
    assert len({version.tags["test_split_sha"] for version in versions}) == 1  # the same split for both
    parent = client.get_run(outcome["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["visionroute.bakeoff"] == "finetune,scratch"
    assert {"bakeoff.json", "bakeoff.png", "decision.json"} <= artifacts(client, parent.info.run_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(run.data.tags["visionroute.route"] for run in children) == ["finetune", "scratch"]
    assert "framework chose finetune" in prefect_artifact("colours-bakeoff")[0].description


@pytest.mark.slow
def test_a_test_split_under_the_minimum_registers_no_champion_and_says_why(tmp_path):
    make_dataset(tmp_path / "data", per_class=10)  # no split given: 2 test images per class
    spec = write_spec(
        tmp_path / "small.yaml",
        "name: small\ntask: classify\ndata: {path: ./data}\ndomain: natural\n"
        "training: {model: tf_efficientnet_lite0, epochs: 1, budget_minutes: 2}\n",
    )
    outcome = route_image_task(str(spec))
    result = outcome["result"]
    assert not result["promoted"]
    assert "as challenger (not promoted: the test split has 4 image(s)" in result["summary"]
    assert "add test images" in result["summary"]
    client = MlflowClient(tracking.tracking_uri())
    version = client.get_model_version_by_alias("small", "challenger")
    assert version.tags["promoted"] == "false"
    assert version.tags["promotion_reason"].startswith("not promoted: the test split has 4 image(s)")
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias("small", "champion")
    decision_md = Path(client.download_artifacts(outcome["parent_run_id"], "decision.md")).read_text()
    assert "no champion from this run" in decision_md
