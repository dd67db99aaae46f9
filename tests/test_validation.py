"""Validation before training: quarantine with reasons, duplicates, label conflicts, train/test leakage."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import make_dataset, make_image, shared_dataset
from PIL import Image

from visionroute.data.dataset import DatasetError, assign_splits, scan_dataset
from visionroute.data.validation import difference_hash, remove_leakage, validate


def test_duplicates_conflicts_and_leakage(tmp_path):
    root = make_dataset(tmp_path / "data", per_class=8, splits=("train", "test"))
    # An exact copy of a training image in test (leakage), and in the other class (label conflict).
    shutil.copy(root / "train" / "red" / "red_0.jpg", root / "test" / "red" / "copy_of_train.jpg")
    shutil.copy(root / "train" / "red" / "red_1.jpg", root / "train" / "blue" / "mislabelled.jpg")
    # A near duplicate: the same photo resized and recompressed.
    with Image.open(root / "train" / "blue" / "blue_0.jpg") as image:
        image.resize((80, 60)).save(root / "test" / "blue" / "smaller.jpg", quality=70)

    dataset, report = validate(scan_dataset(root), progress=False)
    groups = [{row["path"].split("/")[-1] for row in group} for group in report.exact_duplicates]
    assert {"red_0.jpg", "copy_of_train.jpg"} in groups
    assert [{row["label"] for row in group} for group in report.label_conflicts] == [{"red", "blue"}]
    assert any({p["a"]["path"].split("/")[-1], p["b"]["path"].split("/")[-1]} == {"blue_0.jpg", "smaller.jpg"}
               for p in report.near_duplicates)

    split = assign_splits(dataset, seed=0)
    before = len(split.split("test"))
    cleaned = remove_leakage(split, report)
    leaked = {row["path"].split("/")[-1] for row in report.leaked_from_test}
    assert leaked == {"copy_of_train.jpg", "smaller.jpg"}
    assert len(cleaned.split("test")) == before - 2
    assert any("removed from test" in w for w in report.warnings)


def test_quarantine_lists_every_reason_and_counts_channels(tmp_path):
    root = make_dataset(tmp_path / "data", per_class=10)
    (root / "red" / "notes.txt").write_text("x")
    whole = make_image(tmp_path / "whole.jpg", (200, 0, 0), 5, size=(256, 256))
    (root / "red" / "cut.jpg").write_bytes(whole.read_bytes()[:2000])
    Image.fromarray(np.full((16, 16), 1000, dtype=np.uint16)).save(root / "blue" / "deep.png")
    Image.new("L", (16, 16), 3).save(root / "blue" / "grey.png")

    dataset, report = validate(scan_dataset(root), progress=False)
    reasons = {q.path.split("/")[-1]: q.reason for q in report.quarantined}
    assert reasons == {"notes.txt": "not an image file type (.txt)", "cut.jpg": "truncated file"}
    assert report.checked == 24 and len(dataset.samples) == 22
    assert report.channels == {3: 20, 1: 2} and report.bit_depths == {8: 21, 16: 1}


def test_too_many_bad_files_stop_the_run_with_the_report(tmp_path):
    root = make_dataset(tmp_path / "data", per_class=5)
    for index in range(4):
        (root / "red" / f"junk{index}.jpg").write_bytes(b"junk")
    with pytest.raises(DatasetError, match=r"4 of 14 files \(29%\) were quarantined, over the 20% limit") as error:
        validate(scan_dataset(root), progress=False)
    assert len(error.value.report.quarantined) == 4


def test_difference_hash_survives_resizing_but_not_other_content(tmp_path):
    a = make_image(tmp_path / "a.jpg", (200, 40, 40), 1, size=(128, 96))
    b = make_image(tmp_path / "b.jpg", (200, 40, 40), 2, size=(128, 96))
    with Image.open(a) as first, Image.open(b) as other:
        same = difference_hash(first) ^ difference_hash(first.resize((64, 48)))
        different = difference_hash(first) ^ difference_hash(other)
    assert bin(same).count("1") <= 4 < bin(different).count("1")


def test_hymenoptera_validates_with_only_the_gif_quarantined():
    dataset, report = validate(scan_dataset(shared_dataset("hymenoptera_data")), progress=False)
    assert [q.path.split("/")[-1] for q in report.quarantined] == ["imageNotFound.gif"]
    assert len(dataset.samples) == 397
