"""Evaluation you can trust: intervals on test metrics, a minimum test size, promotion beyond noise only, and the
decision saying how the model will be judged."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import make_dataset, write_spec

from visionroute.data.dataset import assign_splits, held_out_split_given, scan_dataset
from visionroute.data.validation import check_leakage, validate
from visionroute.decision.policy import DEFAULT_POLICY
from visionroute.decision.report import decision_markdown
from visionroute.model_registry import promotion_verdict
from visionroute.planning import evaluation_plan, plan
from visionroute.spec import SpecError, load_spec
from visionroute.training.metrics import classification_report, format_accuracy, wilson_interval


@pytest.mark.parametrize(
    ("successes", "trials", "interval"),
    # Reference values: Wilson (1927) score interval at 95%, as tabulated by Newcombe (1998), method 3.
    [
        (81, 263, (0.2553, 0.3662)),
        (15, 148, (0.0624, 0.1605)),
        (0, 20, (0.0, 0.1611)),
        (1, 29, (0.0061, 0.1718)),
    ],
)
def test_wilson_interval_matches_published_values(successes, trials, interval):
    assert wilson_interval(successes, trials) == pytest.approx(interval, abs=1e-4)


def test_test_metrics_carry_their_interval_and_show_it():
    report = classification_report(np.array([0, 0, 1, 1, 1]), np.array([0, 0, 1, 1, 0]), ["a", "b"])
    assert report["accuracy"] == 0.8 and report["accuracy_ci95"] == [0.3755, 0.9638]
    assert format_accuracy(report) == "0.8000 (95% CI 0.38-0.96, 5 images)"
    perfect = classification_report(np.zeros(10, int), np.zeros(10, int), ["a", "b"])
    assert perfect["accuracy_ci95"] == [0.7225, 1.0]  # 10 of 10 right is not certainty


def test_minimum_test_size_is_30_images_and_5_per_class():
    assert DEFAULT_POLICY.test_split_problem({"a": 15, "b": 15}) is None
    too_few = DEFAULT_POLICY.test_split_problem({"a": 3, "b": 3})
    assert "6 image(s)" in too_few and "minimum of 30 images and 5 per class" in too_few
    assert "add test images" in too_few
    lopsided = DEFAULT_POLICY.test_split_problem({"a": 40, "b": 4})
    assert "{'b': 4} in the smallest class(es)" in lopsided


def _metrics(correct: int, total: int, per_class: dict[str, int]) -> dict:
    labels = np.repeat(np.arange(len(per_class)), list(per_class.values()))
    predictions = labels.copy()
    predictions[correct:] = (predictions[correct:] + 1) % len(per_class)
    return classification_report(labels, predictions, list(per_class))


def _champion(accuracy: float, examples: int) -> dict:
    low, high = wilson_interval(round(accuracy * examples), examples)
    return {
        "version": "1",
        "comparable": True,
        "accuracy": accuracy,
        "accuracy_ci95": [low, high],
        "macro_f1": 0,
    }


def test_promotion_needs_a_large_enough_split_and_a_gain_beyond_noise():
    small = _metrics(6, 6, {"a": 3, "b": 3})
    promoted, why = promotion_verdict(small, None)
    assert not promoted and why.startswith("not promoted: the test split has 6 image(s)")

    split = {"a": 60, "b": 60}
    assert promotion_verdict(_metrics(100, 120, split), None) == (True, "first version: no champion yet")
    # 0.85 against 0.8333 on 120 images: inside the champion's interval, a tie keeps it.
    promoted, why = promotion_verdict(_metrics(102, 120, split), _champion(100 / 120, 120))
    assert not promoted and "within the champion's 95% interval" in why and "a tie: champion kept" in why
    # 0.9833 against 0.8333: beyond it.
    promoted, why = promotion_verdict(_metrics(118, 120, split), _champion(100 / 120, 120))
    assert promoted and "+0.1500 is beyond the champion's 95% interval" in why


def test_data_leakage_option_is_strict(tmp_path):
    spec = load_spec(write_spec(tmp_path / "a.yaml", "name: a\ntask: classify\ndata: {leakage: remove}\n"))
    assert spec.data.leakage == "remove"
    assert load_spec(
        write_spec(tmp_path / "b.yaml", "name: b\ntask: classify\ndata: {path: .}\n")
    ).data.leakage == ("report")
    with pytest.raises(SpecError, match="data.leakage"):
        load_spec(write_spec(tmp_path / "c.yaml", "name: c\ntask: classify\ndata: {leakage: drop}\n"))


def test_the_decision_says_how_the_model_will_be_judged(tmp_path):
    make_dataset(tmp_path / "data", per_class=10)  # no split given: 15% of 10, 2 test images per class
    spec = write_spec(
        tmp_path / "small.yaml",
        "name: small\ntask: classify\ndata: {path: ./data}\ndomain: natural\n",
    )
    decision = plan(str(spec), check_images=True).decision
    evaluation = decision.evaluation
    assert evaluation["test_images"] == 4 and evaluation["leaked_test_images"] == 0
    assert evaluation["test_split"].startswith("made by visionroute")
    assert evaluation["leakage_handling"] == "no test image has a copy in train/val"
    assert "minimum of 30 images" in evaluation["cannot_promote"]
    assert any("registered as challenger only" in warning for warning in decision.warnings)
    markdown = decision_markdown("small", decision)
    assert (
        "## Evaluation" in markdown
        and "95% Wilson interval" in markdown
        and "no champion from this run" in markdown
    )


def test_a_given_split_with_leakage_removed_says_so(tmp_path):
    root = make_dataset(tmp_path / "given", per_class=20, splits=("train", "test"))
    shutil.copy(root / "train" / "red" / "red_0.jpg", root / "test" / "red" / "copy.jpg")
    dataset, report = validate(scan_dataset(root), progress=False)
    given = held_out_split_given(dataset)
    dataset = check_leakage(assign_splits(dataset, seed=0), report, remove=True)
    evaluation = evaluation_plan(dataset, report, given, "remove")
    assert evaluation["test_split"] == "given with the data, kept as given minus its leaked images"
    assert evaluation["test_images"] == 40 and evaluation["cannot_promote"] is None
    assert (
        evaluation["leakage_handling"]
        == "1 test image(s) with a copy in train/val removed (data.leakage: remove)"
    )
