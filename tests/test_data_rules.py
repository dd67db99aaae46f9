"""One rule for each data question, the same wherever the data comes from (README: "Data rules")."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import make_dataset, make_image, write_spec

from visionroute.cli import main
from visionroute.data.dataset import scan_dataset
from visionroute.data.validation import validate
from visionroute.spec import SpecError, load_spec


def skipped_reasons(dataset) -> dict[str, str]:
    return {s.path.split("/data/")[-1]: s.reason for s in dataset.skipped}


def test_hidden_files_and_files_in_hidden_folders_are_left_out_and_listed(tmp_path):
    root = make_dataset(tmp_path / "data", per_class=5)
    make_image(root / "red" / ".x.jpg", (200, 40, 40), 901)
    make_image(root / "red" / ".cache" / "y.jpg", (200, 40, 40), 902)
    dataset = scan_dataset(root)
    refs = {s.ref.split("/data/")[-1] for s in dataset.samples}
    assert "red/.x.jpg" not in refs and "red/.cache/y.jpg" not in refs
    reasons = skipped_reasons(dataset)
    assert reasons["red/.x.jpg"] == "hidden ('.x.jpg' starts with '.'); left out"
    assert reasons["red/.cache/y.jpg"] == "hidden ('.cache' starts with '.'); left out"


def test_a_symlink_out_of_the_dataset_is_refused_and_one_inside_it_followed(tmp_path):
    root = make_dataset(tmp_path / "data", per_class=5)
    outside = make_image(tmp_path / "elsewhere" / "secret.jpg", (40, 60, 200), 903)
    (root / "blue" / "outside.jpg").symlink_to(outside)
    (root / "blue" / "inside.jpg").symlink_to(root / "blue" / "blue_0.jpg")
    dataset = scan_dataset(root)
    refs = {s.ref.split("/data/")[-1] for s in dataset.samples}
    assert "blue/inside.jpg" in refs and "blue/outside.jpg" not in refs
    assert skipped_reasons(dataset)["blue/outside.jpg"] == (
        f"links to {outside.resolve()}, outside the dataset folder {root.resolve()}; refused"
    )


def test_the_same_image_in_two_class_folders_leaves_training_and_is_listed(tmp_path):
    root = make_dataset(tmp_path / "data", per_class=6)
    shutil.copy(root / "red" / "red_0.jpg", root / "blue" / "also_red.jpg")
    dataset, report = validate(scan_dataset(root), progress=False)
    refs = {s.ref.split("/data/")[-1] for s in dataset.samples}
    assert not {"red/red_0.jpg", "blue/also_red.jpg"} & refs
    reasons = {s.path.split("/data/")[-1]: s.reason for s in report.quarantined}
    expected = "identical file labelled blue and red: label conflict, left out (keep one copy)"
    assert reasons["red/red_0.jpg"] == reasons["blue/also_red.jpg"] == expected
    assert any("every copy was left out of training" in w for w in report.warnings)


def test_a_spec_that_is_not_utf8_names_the_file_and_the_fix(tmp_path):
    spec = tmp_path / "latin1.yaml"
    spec.write_bytes("name: caf\xe9\ntask: tag\n".encode("latin-1"))
    with pytest.raises(SpecError) as error:
        load_spec(spec)
    assert str(error.value).startswith(
        f"{spec}: not UTF-8 text (byte 0xe9 at offset 9); save the spec as UTF-8"
    )


@pytest.mark.parametrize("value", [".nan", ".inf"])
def test_a_budget_that_is_not_a_number_says_so(tmp_path, value):
    spec = write_spec(tmp_path / "s.yaml", f"name: s\ntask: tag\ntraining: {{budget_minutes: {value}}}\n")
    with pytest.raises(SpecError, match="training.budget_minutes: Input should be a finite number"):
        load_spec(spec)


def test_decide_says_how_many_images_were_checked_by_their_headers_only(tmp_path, capsys):
    root = make_dataset(tmp_path / "data", per_class=6)
    whole = make_image(tmp_path / "whole.jpg", (200, 0, 0), 99, size=(256, 256))
    (root / "red" / "cut.jpg").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    spec = write_spec(
        tmp_path / "colours.yaml", "name: colours\ntask: classify\ndata: {path: ./data}\ndomain: natural\n"
    )
    assert main(["decide", str(spec), "--json"]) == 0
    decision = json.loads(capsys.readouterr().out)
    assert decision["inputs"]["labeled_examples"] == 13  # the truncated file passes a header check
    assert any(
        w.startswith("13 image(s) were checked by their headers only; `visionroute run` decodes every file")
        for w in decision["warnings"]
    )
