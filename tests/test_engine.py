"""The training engine on a tiny real dataset: probe, fine-tune, budget, checkpoints, determinism, metrics."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_dataset

from visionroute.data.dataset import assign_splits, scan_dataset
from visionroute.training.engine import Preprocessing, TrainConfig, build_model, prepare_data, train
from visionroute.training.metrics import classification_report, plot_confusion_matrix
from visionroute.training.weights import load_pretrained, resolve_pretrained

MODEL = "tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("engine") / "data", per_class=10)
    dataset = assign_splits(scan_dataset(root), seed=0)
    model = build_model(MODEL, 2)
    prep = Preprocessing.for_model(model, MODEL, dataset.classes)
    return dataset, prepare_data(dataset, prep)


def fresh_model():
    model = build_model(MODEL, 2)
    load_pretrained(model, resolve_pretrained(MODEL, model), 2)
    return model


def test_probe_then_finetune_learns_and_checkpoints(prepared, tmp_path):
    dataset, data = prepared
    epochs = []
    config = TrainConfig(MODEL, max_epochs=2, budget_seconds=120, checkpoint_dir=tmp_path / "ckpt")
    result = train(config, fresh_model(), data, on_epoch=epochs.append)
    assert result.probe["val_accuracy"] == 1.0  # colour fields: trivially separable on ImageNet features
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert result.test["accuracy"] == 1.0 and result.test["examples"] == len(dataset.split("test"))
    assert (tmp_path / "ckpt" / "last.pt").exists() and (tmp_path / "ckpt" / "best.pt").exists()
    assert result.stopped in ("max_epochs", "early_stopping")


def test_same_seed_same_run(prepared):
    _, data = prepared
    runs = [train(TrainConfig(MODEL, max_epochs=1, seed=7), fresh_model(), data) for _ in range(2)]
    assert runs[0].history[0]["train_loss"] == runs[1].history[0]["train_loss"]
    assert runs[0].history[0]["val_loss"] == runs[1].history[0]["val_loss"]


def test_budget_is_respected(prepared):
    _, data = prepared
    result = train(TrainConfig(MODEL, max_epochs=50, budget_seconds=1.0), fresh_model(), data)
    assert result.stopped == "budget"
    assert len(result.history) == 1


def test_scratch_configuration_trains_from_random_weights(prepared):
    _, data = prepared
    config = TrainConfig(MODEL, pretrained=False, linear_probe=False, max_epochs=1, budget_seconds=60)
    result = train(config, build_model(MODEL, 2), data)
    assert result.probe is None and len(result.history) == 1


def test_metrics_and_confusion_matrix(tmp_path):
    report = classification_report([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], ["a", "b", "c"])
    assert report["accuracy"] == pytest.approx(0.6)
    assert report["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert report["per_class"]["b"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "support": 2}
    assert np.array(report["confusion_matrix"]).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    png = plot_confusion_matrix(report["confusion_matrix"], ["a", "b", "c"], tmp_path / "cm.png", "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
