"""The measured domain distance: LogME and kNN on known cases, `domain: auto` in the rules, real datasets."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import shared_dataset

from visionroute.data.dataset import scan_dataset
from visionroute.data.domain import FAR_BELOW_KNN_GAIN, knn_accuracy, logme, measure_domain
from visionroute.decision.rules import CannotDecide, DataSummary, decide
from visionroute.spec import parse_spec


def features(informative: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1, 2], 60)
    noise = rng.normal(size=(180, 32))
    if informative:
        noise[:, :3] += 4 * np.eye(3)[labels]
    return noise, labels


def test_logme_and_knn_rank_informative_features_above_noise():
    good, labels = features(True)
    noise, _ = features(False)
    assert logme(good, labels) > logme(noise, labels)
    assert knn_accuracy(good, labels) > 0.8 > 0.5 > knn_accuracy(noise, labels)


def measured(far: bool) -> dict:
    return {"far": far, "knn_gain": 0.0 if far else 0.3, "sentence": f"Measured: {'far' if far else 'like'}."}


def spec(domain: str):
    return parse_spec({"name": "t", "task": "classify", "domain": domain})


def test_domain_auto_follows_the_measurement():
    counts = {"a": 15_000, "b": 15_000}
    far = decide(spec("auto"), DataSummary(30_000, counts, measured(True)))
    assert (far.route, far.rule) == ("scratch", "specific-far-large-scratch")
    assert "Measured: far." in far.reasons
    near = decide(spec("auto"), DataSummary(30_000, counts, measured(False)))
    assert (near.route, near.rule) == ("finetune", "specific-imagenet-like-finetune")
    with pytest.raises(CannotDecide, match="domain: auto needs the images measured"):
        decide(spec("auto"), DataSummary(30_000, counts))


def test_a_measurement_contradicting_the_declared_domain_is_a_warning():
    decision = decide(spec("medical"), DataSummary(3000, {"a": 1500, "b": 1500}, measured(True)))
    assert decision.rule == "specific-imagenet-like-finetune"  # the declared domain still decides
    assert any(
        "declared domain 'medical' is ImageNet-like but the images measure far" in w
        for w in decision.warnings
    )


def test_measured_on_real_data_natural_photos_are_imagenet_like_and_28px_xrays_are_not():
    """Small samples (160 images) keep this test quick; bench/data_profile.py measures 1,000 per dataset."""
    photos = measure_domain(scan_dataset(shared_dataset("hymenoptera_data")), limit=160, progress=False)
    xrays = measure_domain(
        scan_dataset(shared_dataset("pneumoniamnist") / "pneumoniamnist.npz"), limit=160, progress=False
    )
    assert photos.knn_gain > FAR_BELOW_KNN_GAIN and not photos.far
    assert photos.logme_gain > xrays.logme_gain
    assert xrays.far
