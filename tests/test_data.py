"""Bad input, image by image: what is converted, what is skipped (with the reason) and what is refused."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from conftest import make_dataset, make_image, shared_dataset
from PIL import Image

from visionroute.data.dataset import DatasetError, assign_splits, decode_all, scan_dataset
from visionroute.data.images import ImageRejected, load_rgb
from visionroute.decision.rules import CannotDecide, DataSummary, decide
from visionroute.spec import parse_spec


def png_with_header_size(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR claims another size (with a valid CRC): a decompression-bomb header."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data[12:29]
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def test_grayscale_cmyk_palette_16bit_are_converted_to_rgb(tmp_path):
    Image.new("L", (8, 8), 100).save(tmp_path / "grey.png")
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 1
    palette.save(tmp_path / "palette.png", transparency=1)
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / "deep.png")

    grey = load_rgb(tmp_path / "grey.png")
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (100, 100, 100)
    red = load_rgb(tmp_path / "cmyk.jpg").getpixel((4, 4))
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    # Transparent palette pixels are composited on white, not turned black.
    assert load_rgb(tmp_path / "palette.png").getpixel((0, 0)) == (255, 255, 255)
    # 16-bit is scaled to 8 bits (32768 -> 128), not clipped to 255.
    assert load_rgb(tmp_path / "deep.png").getpixel((0, 0)) == (128, 128, 128)


def test_exif_rotation_is_honoured(tmp_path):
    image = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_rgb(tmp_path / "rotated.jpg").size == (20, 40)


def test_truncated_jpeg_is_rejected_with_the_reason(tmp_path):
    path = make_image(tmp_path / "whole.jpg", (200, 0, 0), 1, size=(256, 256))
    (tmp_path / "cut.jpg").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ImageRejected, match="truncated"):
        load_rgb(tmp_path / "cut.jpg")


def test_decompression_bombs_are_refused(tmp_path):
    (tmp_path / "huge.png").write_bytes(png_with_header_size(30_000, 30_000))
    (tmp_path / "big.png").write_bytes(png_with_header_size(9_000, 9_000))  # over our limit, under Pillow's
    for name in ("huge.png", "big.png"):
        with pytest.raises(ImageRejected, match="decompression bomb"):
            load_rgb(tmp_path / name)


def test_bad_files_in_a_class_folder_are_skipped_and_listed(tmp_path):
    root = make_dataset(tmp_path / "data", per_class=6)
    ants = root / "red"
    (ants / "notes.txt").write_text("not a picture")
    (ants / "empty.jpg").write_bytes(b"")
    (ants / "garbage.jpg").write_bytes(b"\x00\x01 definitely not a jpeg")
    (ants / "bomb.png").write_bytes(png_with_header_size(30_000, 30_000))
    Image.new("RGB", (4, 4)).save(ants / "anim.gif")
    Image.new("RGB", (4, 4)).save(ants / "png_named.jpg", "PNG")  # wrong extension, real image: kept
    whole = make_image(ants / "whole.jpg", (200, 0, 0), 99, size=(256, 256))
    (ants / "cut.jpg").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])

    dataset = scan_dataset(root)
    reasons = {path.split("/")[-1]: reason for path, reason in ((s.path, s.reason) for s in dataset.skipped)}
    assert reasons["notes.txt"].startswith("not an image file type")
    assert reasons["anim.gif"].startswith("not an image file type (.gif)")
    assert "empty" in reasons["empty.jpg"] or "not an image" in reasons["empty.jpg"]
    assert reasons["garbage.jpg"] == "not an image file (no known image header)"
    assert "decompression bomb" in reasons["bomb.png"]
    assert dataset.per_class() == {"blue": 6, "red": 9}  # 6 + png_named + whole + cut (until decoded)

    decoded, rejected = decode_all(dataset, lambda image: image.size, progress=False)
    assert [path.split("/")[-1] for path in rejected] == ["cut.jpg"]
    assert "truncated" in next(iter(rejected.values()))
    assert dataset.without(rejected).per_class()["red"] == 8


def test_empty_class_folder_is_an_error(tmp_path):
    root = make_dataset(tmp_path / "data", per_class=6)
    (root / "green").mkdir()
    with pytest.raises(DatasetError, match=r"\['green'\] hold no usable images"):
        scan_dataset(root)


def test_one_class_only_and_too_few_images_are_errors(tmp_path):
    one = make_dataset(tmp_path / "one", per_class=6, classes=("red",))
    summary = DataSummary(6, scan_dataset(one).per_class())
    spec = parse_spec({"name": "t", "task": "classify"})
    with pytest.raises(CannotDecide, match="only one class"):
        decide(spec, summary)
    few = make_dataset(tmp_path / "few", per_class=4)
    with pytest.raises(CannotDecide, match="class 'blue' has 4 labelled image"):
        decide(spec, DataSummary(8, scan_dataset(few).per_class()))


def test_declared_classes_must_match_the_folders(tmp_path):
    root = make_dataset(tmp_path / "data", per_class=5)
    with pytest.raises(DatasetError, match=r"no folder for class\(es\) \['green'\]"):
        scan_dataset(root, ["red", "blue", "green"])
    with pytest.raises(DatasetError, match=r"folder\(s\) \['blue'\] are not in 'classes'"):
        scan_dataset(root, ["red"])


def test_no_class_folders_is_an_error(tmp_path):
    (tmp_path / "flat").mkdir()
    make_image(tmp_path / "flat" / "a.jpg", (1, 2, 3), 1)
    with pytest.raises(DatasetError, match="no class folders"):
        scan_dataset(tmp_path / "flat")


def test_splits_are_stratified_deterministic_and_never_report_on_the_early_stopping_split(tmp_path):
    unsplit = scan_dataset(make_dataset(tmp_path / "flat", per_class=20))
    first, second = assign_splits(unsplit, seed=3), assign_splits(unsplit, seed=3)
    assert first.split_manifest() == second.split_manifest()
    assert first.counts()["test"] == {"red": 3, "blue": 3}
    assert assign_splits(unsplit, seed=4).split_digest() != first.split_digest()

    given = scan_dataset(make_dataset(tmp_path / "tv", per_class=10, splits=("train", "val")))
    roles = assign_splits(given, seed=0)
    val_folder = {s.ref for s in given.samples if s.split == "val"}
    assert {s.ref for s in roles.split("test")} == val_folder  # val/ is held out for the final figures
    assert all("/train/" in s.ref for s in roles.split("val"))


def test_npz_layout_and_its_errors(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (30, 28, 28), dtype=np.uint8)
    good = tmp_path / "good.npz"
    np.savez(
        good,
        train_images=images[:20],
        train_labels=np.arange(20).reshape(-1, 1) % 2,
        test_images=images[20:],
        test_labels=np.arange(10).reshape(-1, 1) % 2,
    )
    dataset = scan_dataset(good, ["normal", "pneumonia"])
    assert dataset.counts()["train"] == {"normal": 10, "pneumonia": 10}
    assert dataset.load(dataset.samples[0]).mode == "RGB"

    mismatched = tmp_path / "bad.npz"
    np.savez(mismatched, train_images=images, train_labels=np.zeros((29, 1)))
    with pytest.raises(DatasetError, match="30 rows but train_labels has 29"):
        scan_dataset(mismatched)
    outside = tmp_path / "outside.npz"
    np.savez(outside, train_images=images, train_labels=np.full((30, 1), 5))
    with pytest.raises(DatasetError, match="outside the 2 classes"):
        scan_dataset(outside, ["a", "b"])


def test_hymenoptera_gif_placeholder_is_skipped_with_its_reason():
    dataset = scan_dataset(shared_dataset("hymenoptera_data"))
    skipped = {s.path.split("/")[-1]: s.reason for s in dataset.skipped}
    assert list(skipped) == ["imageNotFound.gif"]
    assert "(.gif)" in skipped["imageNotFound.gif"]
    assert dataset.counts()["train"] == {"ants": 123, "bees": 121}


def test_csv_manifest_with_splits_and_its_bad_rows(tmp_path):
    root = make_dataset(tmp_path / "photos", per_class=6)
    (tmp_path / "secret.jpg").write_bytes((root / "red" / "red_0.jpg").read_bytes())
    rows = ["path,label,split"]
    rows += [f"red/red_{i}.jpg,red,{'test' if i == 0 else 'train'}" for i in range(6)]
    rows += [f"blue/blue_{i}.jpg,blue,{'test' if i == 0 else 'train'}" for i in range(6)]
    rows += [
        "../secret.jpg,red,train",
        "red/gone.jpg,red,train",
        "blue/blue_1.jpg,purple,train",
        "blue/blue_2.jpg,blue,holdout",
    ]
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")

    assert scan_dataset(manifest).classes == [
        "blue",
        "purple",
        "red",
    ]  # no class list: the labels are the classes
    dataset = scan_dataset(manifest, ["blue", "red"])
    assert dataset.classes == ["blue", "red"]
    assert dataset.counts()["test"] == {"blue": 1, "red": 1}
    reasons = {s.path.rsplit(":", 1)[1]: s.reason for s in dataset.skipped}
    assert reasons["14"].startswith("path '../secret.jpg' points outside the manifest's folder")
    assert reasons["15"] == "file red/gone.jpg does not exist"
    assert reasons["16"].startswith("label 'purple' is not one of the classes")
    assert reasons["17"].startswith("split 'holdout' is not one of")


def test_csv_manifest_header_is_checked(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,class\na.jpg,x\n")
    with pytest.raises(DatasetError, match="header must be path,label"):
        scan_dataset(manifest)


def test_one_pixel_image_is_usable(tmp_path):
    Image.new("RGB", (1, 1), (9, 9, 9)).save(tmp_path / "dot.png")
    assert load_rgb(tmp_path / "dot.png").size == (1, 1)


def test_given_train_and_test_folders_keep_their_test_split(tmp_path):
    given = scan_dataset(make_dataset(tmp_path / "tt", per_class=10, splits=("train", "test")))
    roles = assign_splits(given, seed=0)
    assert {s.ref for s in roles.split("test")} == {s.ref for s in given.samples if s.split == "test"}
    assert all("/train/" in s.ref for s in roles.split("val"))
