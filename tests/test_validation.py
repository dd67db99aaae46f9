"""Validation before training: quarantine with reasons, duplicates, label conflicts, train/test leakage."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import bench_module, make_dataset, make_image, shared_dataset
from PIL import Image

from visionroute.data.dataset import DatasetError, assign_splits, scan_dataset
from visionroute.data.validation import (
    NEAR_DUPLICATE_MAX_DISTANCE,
    check_leakage,
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

    # The split is given (train/ test/ folders): test stays as given, and its two copies are reported.
    split = assign_splits(dataset, seed=0)
    before = len(split.split("test"))
    kept = check_leakage(split, report)
    assert {row["path"].split("/")[-1] for row in report.leaked_from_test} == {
        "copy_of_train.jpg",
        "smaller.jpg",
    }
    assert len(kept.split("test")) == before and not report.leakage_removed
    assert any(
        "2 of 6 test image(s) have a copy in train/val; the given test split is kept" in w
        for w in report.warnings
    )
    # data.leakage: remove drops them instead, and says so.
    removed = check_leakage(split, report, remove=True)
    assert len(removed.split("test")) == before - 2 and report.leakage_removed
    assert any("were removed from test (data.leakage: remove)" in w for w in report.warnings)


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
    assert same >= 1 - NEAR_DUPLICATE_MAX_DISTANCE > different
    # Two unrelated textures under the same illumination gradient (what fooled a difference hash on NEU steel).
    rng = np.random.default_rng(0)
    gradient = np.linspace(200, 40, 128)[None, :]
    lit = [
        Image.fromarray(np.clip(gradient + rng.normal(0, 12, (128, 128)), 0, 255).astype(np.uint8))
        for _ in range(2)
    ]
    assert (
        similarity(thumbnail_signature(lit[0]), thumbnail_signature(lit[1])) < 1 - NEAR_DUPLICATE_MAX_DISTANCE
    )


def test_neu_steel_has_no_cross_class_near_duplicates():
    _, report = validate(scan_dataset(shared_dataset("neu_steel_defects")), progress=False)
    assert not [p for p in report.near_duplicates if p["a"]["label"] != p["b"]["label"]]
    assert len(report.exact_duplicates) == 1  # patches_101.jpg and patches_105.jpg are the same file


def test_hymenoptera_validates_with_only_the_gif_quarantined():
    dataset, report = validate(scan_dataset(shared_dataset("hymenoptera_data")), progress=False)
    assert [q.path.split("/")[-1] for q in report.quarantined] == ["imageNotFound.gif"]
    assert len(dataset.samples) == 397


def _groups_by_split(dataset) -> dict[int, set[str]]:
    splits: dict[int, set[str]] = {}
    for sample in dataset.samples:
        if sample.ref in dataset.duplicate_groups:
            splits.setdefault(dataset.duplicate_groups[sample.ref], set()).add(sample.split)
    return splits


def test_the_digit_set_keeps_its_test_split(tmp_path):
    # 1,797 grey 8x8 digits in class folders, no split given: most images of a class correlate above 0.9, which
    # made the old detector pair 99% of them and empty the test split.
    root = bench_module("near_duplicates").write_digits(tmp_path / "digits")
    dataset, report = validate(scan_dataset(root), progress=False)
    assert len(dataset.samples) == 1797 and len(report.near_duplicates) <= 18  # under 1% of the images
    split = check_leakage(assign_splits(dataset, seed=0), report)
    assert len(split.split("test")) >= 250
    assert report.leaked_from_test == []  # visionroute's own split keeps copies together
    assert all(len(splits) == 1 for splits in _groups_by_split(split).values())


@pytest.mark.parametrize("source", ["digits", "photos"])
def test_planted_near_copies_are_found_and_distinct_images_are_not(tmp_path, source):
    near_duplicates = bench_module("near_duplicates")
    if source == "digits":
        root = near_duplicates.write_digits(tmp_path / "source")
    else:
        root = photo_dataset(tmp_path / "source")
    originals, copies = near_duplicates.build(str(root), tmp_path / "planted", planted=40, seed=0)
    dataset, report = validate(scan_dataset(tmp_path / "planted"), progress=False)
    representatives, same, pairs = near_duplicates.validated_pairs(dataset, report)
    scores = near_duplicates.score(pairs, representatives, originals, copies, same)
    kinds = {path.rsplit("_", 1)[1].split(".")[0] for path in copies}
    assert kinds == set(near_duplicates.TRANSFORMS)  # JPEG re-encode, resize, 4% crop, brightness
    assert scores["recall"] >= 0.95
    assert scores["false_positive_share"] <= 0.01


def test_given_npz_splits_keep_their_test_images_and_report_the_copies(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 255, (40, 28, 28), dtype=np.uint8)
    val = rng.integers(0, 255, (10, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 255, (12, 28, 28), dtype=np.uint8)
    test[:3] = train[:3]  # three official test images are copies of training images
    val[0] = train[4]  # and one validation image (same label: a copy under another label is a label conflict)
    labels = lambda n: (np.arange(n) % 2).reshape(n, 1)  # noqa: E731
    path = tmp_path / "given.npz"
    arrays = {"train": train, "val": val, "test": test}
    np.savez(
        path,
        **{f"{k}_images": v for k, v in arrays.items()},
        **{f"{k}_labels": labels(len(v)) for k, v in arrays.items()},
    )
    dataset, report = validate(scan_dataset(path), progress=False)
    split = assign_splits(dataset, seed=0)
    kept = check_leakage(split, report)
    assert len(kept.split("test")) == 12
    assert sorted(row["path"] for row in report.leaked_from_test) == [
        "npz:test:0",
        "npz:test:1",
        "npz:test:2",
    ]
    assert "1 validation image(s) have a copy in train" in " ".join(report.warnings)
    assert len(check_leakage(split, report, remove=True).split("test")) == 9


def test_splits_visionroute_makes_keep_each_duplicate_group_in_one_split(tmp_path):
    root = make_dataset(tmp_path / "data", per_class=20)
    for index in range(6):  # an exact copy and a resized, recompressed copy of six images
        name = f"red_{index}.jpg"
        shutil.copy(root / "red" / name, root / "red" / f"copy_{index}.jpg")
        with Image.open(root / "red" / name) as image:
            image.resize((80, 60)).save(root / "red" / f"small_{index}.jpg", quality=60)
    dataset, report = validate(scan_dataset(root), progress=False)
    assert len(report.exact_duplicates) == 6 and len(report.near_duplicates) == 6
    for seed in range(5):
        split = check_leakage(assign_splits(dataset, seed=seed), report)
        groups = _groups_by_split(split)
        assert len(groups) == 6 and all(len(splits) == 1 for splits in groups.values())
        assert report.leaked_from_test == []
        test = split.counts()["test"]  # 15% of 32 and of 20, overshooting by less than one group of 3
        assert 5 <= test["red"] <= 7 and test["blue"] == 3


def test_pneumoniamnist_keeps_its_official_test_split():
    dataset, report = validate(
        scan_dataset(shared_dataset("pneumoniamnist") / "pneumoniamnist.npz"), progress=False
    )
    split = check_leakage(assign_splits(dataset, seed=0), report)
    assert len(split.split("test")) == 624 and not report.leakage_removed
    assert len(report.exact_duplicates) == 26  # identical images: reported
    assert len(report.near_duplicates) <= 50  # not the 34,688 pairs of the old detector
