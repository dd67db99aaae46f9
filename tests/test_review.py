"""Review and promotion in a real MLflow registry: descriptions, a named promotion, rollback, alias history.

Two real training runs of a task filled in through the flow's form (not a spec file), then the reviewer's day.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import COLOURS, make_dataset, make_image, prefect_artifact
from mlflow.tracking import MlflowClient
from visionroute.flows.predict import predict_images
from visionroute.flows.reevaluate import reevaluate_champions
from visionroute.flows.review import review_model
from visionroute.flows.route import route_image_task

from visionroute import review, tracking
from visionroute.cli import main
from visionroute.forms import RunOverrides, TaskForm

pytestmark = [pytest.mark.flow, pytest.mark.slow]


@pytest.fixture(autouse=True)
def on_prefect(prefect_harness):
    """Every test here runs its flows on the session's Prefect harness."""


def test_versions_explain_themselves_and_promotions_are_recorded(tmp_path, capsys):
    # A given test split of 15 per class: the smallest on which a champion can be chosen (30 and 5 per class).
    data = make_dataset(tmp_path / "data", per_class=10, splits=("train",))
    for name in ("red", "blue"):
        for index in range(15):
            make_image(data / "test" / name / f"{name}_{index}.jpg", COLOURS[name], 1000 + index)
    form = TaskForm(
        name="review-colours",
        classes=["red", "blue"],
        data_path=str(data),
        monthly_volume=1000,
        model="tf_efficientnet_lite0",
        budget_minutes=5,
    )
    first = route_image_task(task=form, overrides=RunOverrides(epochs=1, budget_minutes=1))["result"]
    second = route_image_task(task=form, overrides=RunOverrides(epochs=1, budget_minutes=1))["result"]
    assert (first["model_version"], first["promoted"]) == ("1", True)
    assert (second["model_version"], second["promoted"]) == ("2", False)
    client = MlflowClient(tracking.tracking_uri())
    # The form became a spec file, logged with the run like any spec.
    assert list((tmp_path / "state" / "specs").glob("review-colours-*.yaml"))

    # What a reviewer reads on each version and on the model.
    v1 = client.get_model_version("review-colours", "1").description
    assert "Route** `finetune` by rule `specific-imagenet-like-finetune`" in v1
    assert "first version: no champion yet" in v1 and "evaluation/confusion_matrix.png" in v1
    assert "data split (train/val/test) sha" in v1 and "**Warnings**" in v1
    v2 = client.get_model_version("review-colours", "2").description
    assert "| accuracy | 1.0000 | 1.0000 |" in v2 and "champion v1" in v2
    model = client.get_registered_model("review-colours").description
    assert "visionroute predict --model models:/review-colours@champion" in model
    assert "classify into red, blue" in model and "| v1 | - | visionroute (automatic) | automatic |" in model

    # A person promotes v2: recorded on the versions and in the alias history.
    before = datetime.now(UTC)
    time.sleep(1.1)  # history times are to the second
    assert (
        main(["promote", "review-colours", "2", "--reviewer", "Ada", "--reason", "same accuracy, newer data"])
        == 0
    )
    assert "champion v1 -> v2 (promote by Ada)" in capsys.readouterr().out
    champion = client.get_model_version_by_alias("review-colours", "champion")
    assert str(champion.version) == "2"
    tags = champion.tags
    assert (tags["review.reviewer"], tags["review.reason"]) == ("Ada", "same accuracy, newer data")
    assert (tags["review.previous_champion"], tags["review.new_champion"], tags["review.action"]) == (
        "1",
        "2",
        "promote",
    )
    assert datetime.fromisoformat(tags["review.time"]) >= before
    assert client.get_model_version("review-colours", "1").tags["review.replaced_by"] == "2"
    assert review.champion_on(client, "review-colours", before)["version"] == "1"
    now = review.champion_on(client, "review-colours", datetime.now(UTC))
    assert (now["version"], now["reviewer"], now["previous"]) == ("2", "Ada", "1")
    assert main(["history", "review-colours", "--at", before.isoformat()]) == 0
    assert '"reviewer": "visionroute (automatic)"' in capsys.readouterr().out

    # Rollback from the review-model flow: champion goes back to v1, appended (nothing rewritten).
    entry = review_model(name="review-colours", action="rollback", reviewer="Bo", reason="v2 mislabels bees")
    assert (entry["version"], entry["previous"], entry["action"]) == ("1", "2", "rollback")
    assert str(client.get_model_version_by_alias("review-colours", "champion").version) == "1"
    entries = review.history(client, "review-colours")
    assert [(e["version"], e["action"]) for e in entries] == [
        ("1", "automatic"),
        ("2", "promote"),
        ("1", "rollback"),
    ]
    assert (
        "| v1 | v2 | Bo | rollback | v2 mislabels bees |" in prefect_artifact("review-colours-review")[0].data
    )
    assert "| v1 | v2 | Bo | rollback |" in client.get_registered_model("review-colours").description

    # Refused: the current champion again, a version that never finished its evaluation, no reviewer.
    assert main(["promote", "review-colours", "1", "--reviewer", "Ada", "--reason", "again"]) == 2
    assert "already champion" in capsys.readouterr().err
    source = client.get_model_version("review-colours", "2")
    half = client.create_model_version("review-colours", source.source, run_id=source.run_id)
    assert main(["promote", "review-colours", str(half.version), "--reviewer", "Ada", "--reason", "x"]) == 2
    assert "never completed its evaluation" in capsys.readouterr().err
    with pytest.raises(review.ReviewError, match="reviewer's name and a reason"):
        review.promote(client, "review-colours", "2", "", "")
    assert len(review.history(client, "review-colours")) == 3

    # The predict deployment's flow labels a folder with the champion: a file of JSON lines and a table.
    labelled = predict_images(
        model="models:/review-colours@champion", images=str(data / "test" / "blue"), out=""
    )
    assert labelled["images"] == labelled["labelled"] == 15 and labelled["per_label"] == {"blue": 15}
    assert len(Path(labelled["out"]).read_text().splitlines()) == 15
    assert "15 of 15 image(s) labelled" in prefect_artifact("predict-results")[0].description

    # Nightly re-evaluation: the saved test split scores what was recorded; new, mislabelled photos (blue
    # photos filed under red) are a drop: recorded in MLflow and raised as a Prefect artifact.
    steady = reevaluate_champions()
    assert [(r["model"], r["version"], r["test_accuracy_drift"], r["dropped"]) for r in steady] == [
        ("review-colours", "1", 0.0, False)
    ]
    for index in range(6):
        make_image(data / "train" / "red" / f"new_{index}.jpg", COLOURS["blue"], 900 + index)
    drifted = reevaluate_champions(names=["review-colours"], max_drop=0.05)[0]
    assert drifted["new_images"] == 6 and drifted["new_data_accuracy"] <= 0.5 and drifted["dropped"]
    assert "accuracy dropped" in prefect_artifact("review-colours-drift-alert")[0].data
    run = client.get_run(drifted["run_id"])
    assert run.data.metrics["new_data_drift"] == pytest.approx(
        drifted["new_data_accuracy"] - drifted["recorded_test_accuracy"]
    )
    assert run.data.tags["visionroute.dropped"] == "true"
