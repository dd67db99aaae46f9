"""Validation before training: quarantine with reasons, duplicates, label conflicts, train/test leakage."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import make_dataset, make_image, shared_dataset
from PIL import Image

from visionroute.data.dataset import DatasetError, assign_splits, scan_dataset
from visionroute.data.validation import (
    NEAR_DUPLICATE_CORRELATION,
    remove_leakage,
    similarity,
    thumbnail_signature,
    validate,
)

PHOTOS = {  # real photographs and textures shipped with scikit-image
    ("train", "red"): ["astronaut", "chelsea", "coffee", "rocket"],
    ("train", "blue"): ["camera", "coins", "moon", "brick"],
    ("test", "red"): ["grass", "gravel"],
    ("test", "blue"): ["page", "text"],
}


def photo_dataset(root):
    import skimage.data

    for (split, label), names in PHOTOS.items():
        (root / split / label).mkdir(parents=True, exist_ok=True)
        for name in names:
            Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(
                root / split / label / f"{name}.jpg"
            )
    return root


def test_duplicates_conflicts_and_leakage(tmp_path):
    root = photo_dataset(tmp_path / "data")
    # An exact copy of a training photo in test (leakage), and in the other class (label conflict).
    shutil.copy(root / "train" / "red" / "astronaut.jpg", root / "test" / "red" / "copy_of_train.jpg")
    shutil.copy(root / "train" / "red" / "rocket.jpg", root / "train" / "blue" / "mislabelled.jpg")
    # A near duplicate: a training photo resized and recompressed.
    with Image.open(root / "train" / "red" / "chelsea.jpg") as image:
        image.resize((200, 150)).save(root / "test" / "blue" / "smaller.jpg", quality=60)

    dataset, report = validate(scan_dataset(root), progress=False)
    groups = [{row["path"].split("/")[-1] for row in group} for group in report.exact_duplicates]
    assert sorted(map(sorted, groups)) == [
        ["astronaut.jpg", "copy_of_train.jpg"],
        ["mislabelled.jpg", "rocket.jpg"],
    ]
    assert [{row["label"] for row in group} for group in report.label_conflicts] == [{"red", "blue"}]
    near = [{p["a"]["path"].split("/")[-1], p["b"]["path"].split("/")[-1]} for p in report.near_duplicates]
    assert near == [{"chelsea.jpg", "smaller.jpg"}]

    split = assign_splits(dataset, seed=0)
    before = len(split.split("test"))
    cleaned = remove_leakage(split, report)
    assert {row["path"].split("/")[-1] for row in report.leaked_from_test} == {
        "copy_of_train.jpg",
        "smaller.jpg",
    }
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
    with pytest.raises(
        DatasetError, match=r"4 of 14 files \(29%\) were quarantined, over the 20% limit"
    ) as error:
        validate(scan_dataset(root), progress=False)
    assert len(error.value.report.quarantined) == 4


def test_signature_survives_resizing_but_not_other_content_or_a_shared_gradient(tmp_path):
    a = make_image(tmp_path / "a.jpg", (200, 40, 40), 1, size=(128, 96))
    b = make_image(tmp_path / "b.jpg", (200, 40, 40), 2, size=(128, 96))
    with Image.open(a) as first, Image.open(b) as other:
        same = similarity(thumbnail_signature(first), thumbnail_signature(first.resize((64, 48))))
        different = similarity(thumbnail_signature(first), thumbnail_signature(other))
    assert same >= NEAR_DUPLICATE_CORRELATION > different
    # Two unrelated textures under the same illumination gradient (what fooled a difference hash on NEU steel).
    rng = np.random.default_rng(0)
    gradient = np.linspace(200, 40, 128)[None, :]
    lit = [
        Image.fromarray(np.clip(gradient + rng.normal(0, 12, (128, 128)), 0, 255).astype(np.uint8))
        for _ in range(2)
    ]
    assert similarity(thumbnail_signature(lit[0]), thumbnail_signature(lit[1])) < NEAR_DUPLICATE_CORRELATION


def test_neu_steel_has_no_cross_class_near_duplicates():
    _, report = validate(scan_dataset(shared_dataset("neu_steel_defects")), progress=False)
    assert not [p for p in report.near_duplicates if p["a"]["label"] != p["b"]["label"]]
    assert len(report.exact_duplicates) == 1  # patches_101.jpg and patches_105.jpg are the same file


def test_hymenoptera_validates_with_only_the_gif_quarantined():
    dataset, report = validate(scan_dataset(shared_dataset("hymenoptera_data")), progress=False)
    assert [q.path.split("/")[-1] for q in report.quarantined] == ["imageNotFound.gif"]
    assert len(dataset.samples) == 397
