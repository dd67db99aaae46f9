"""The task spec's strictness, the price file, and the `decide` / `schema` commands' output and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, write_spec

from visionroute.cli import main
from visionroute.decision.costs import load_prices
from visionroute.spec import SpecError, load_spec

EXAMPLES = REPO / "examples" / "tasks"

# The route the rules give each example spec (the done-when line for `visionroute decide`).
EXPECTED = {
    "ants-vs-bees.yaml": ("finetune", None, "specific-imagenet-like-finetune"),
    "invoice-ocr.yaml": ("vision_api", "aws", "generic-api"),
    "clinic-photo-tagging.yaml": ("vision_api", "local", "generic-private-local"),
    "radar-returns.yaml": ("scratch", None, "specific-far-large-scratch"),
    "steel-defects.yaml": ("finetune", None, "specific-imagenet-like-finetune"),
}


def test_every_example_spec_gets_the_route_the_rules_give(capsys):
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(EXPECTED)
    for name, (route, provider, rule) in EXPECTED.items():
        assert main(["decide", str(EXAMPLES / name), "--json"]) == 0
        decision = json.loads(capsys.readouterr().out)
        assert (decision["route"], decision["provider"], decision["rule"]) == (route, provider, rule), name
        for key in ("reasons", "rejected", "warnings", "costs"):
            assert key in decision


def test_decide_prints_readable_markdown(capsys):
    assert main(["decide", str(EXAMPLES / "invoice-ocr.yaml")]) == 0
    out = capsys.readouterr().out
    assert "route `vision_api` (provider `aws`)" in out and "Break-even volume" in out


def test_schema_is_the_spec_model(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) >= {"name", "task", "classes", "data", "domain", "constraints", "route"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("name: x\ntask: classify\ncolour: red\n", "colour: unknown field"),
        ("task: classify\n", "name: required field is missing"),
        ("name: x\ntask: classify\nconstraints: {monthly_volume: lots}\n", "constraints.monthly_volume"),
        ("name: Bad_Name\ntask: tag\n", "name: String should match pattern"),
        ("name: x\ntask: paint\n", "task: Input should be"),
        ("name: x\ntask: tag\nclasses: [a, b]\n", "'classes' applies to task classify only"),
        ("name: x\ntask: classify\nclasses: [a, a]\n", "'classes' has duplicates"),
        ("name: x\ntask: classify\nconstraints: {monthly_volume: -5}\n", "greater than or equal to 0"),
        ("- just\n- a list\n", "a task spec is a YAML mapping"),
        ("name: x\ntask: [unclosed\n", "not valid YAML"),
    ],
)
def test_invalid_specs_exit_2_naming_the_field(tmp_path, capsys, body, message):
    path = write_spec(tmp_path / "bad.yaml", body)
    assert main(["decide", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_missing_spec_file_is_a_clear_error(tmp_path, capsys):
    assert main(["decide", str(tmp_path / "nope.yaml")]) == 2
    assert "no such spec file" in capsys.readouterr().err


def test_relative_data_path_resolves_against_the_spec_folder(tmp_path):
    (tmp_path / "specs").mkdir()
    path = write_spec(tmp_path / "specs" / "t.yaml", "name: t\ntask: classify\ndata: {path: ../data}\n")
    assert load_spec(path).data.path == (tmp_path / "data").resolve()


def test_missing_data_path_is_a_clear_error(tmp_path, capsys):
    path = write_spec(tmp_path / "t.yaml", "name: t\ntask: classify\ndata: {path: ./nowhere}\n")
    assert main(["decide", str(path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_specific_task_with_no_data_says_what_to_provide(tmp_path, capsys):
    path = write_spec(tmp_path / "t.yaml", "name: t\ntask: classify\n")
    assert main(["decide", str(path)]) == 2
    assert "set data.path" in capsys.readouterr().err


def test_spec_digest_is_stable_and_content_based(tmp_path):
    a = load_spec(write_spec(tmp_path / "a.yaml", "name: t\ntask: tag\n"))
    b = load_spec(write_spec(tmp_path / "b.yaml", "task: tag\nname: t\n"))
    c = load_spec(write_spec(tmp_path / "c.yaml", "name: t\ntask: ocr\n"))
    assert a.digest() == b.digest() != c.digest()
    with pytest.raises(SpecError):
        load_spec(write_spec(tmp_path / "d.yaml", "name: t\n"))


def test_own_price_file_changes_the_decision(tmp_path, capsys):
    import yaml

    prices = yaml.safe_load(Path(load_prices().source).read_text())
    for provider in prices["vision_api"].values():
        provider["per_1000"] = {task: price * 100 for task, price in provider["per_1000"].items()}
    own = tmp_path / "prices.yaml"
    own.write_text(yaml.safe_dump(prices))
    assert main(["decide", str(EXAMPLES / "invoice-ocr.yaml"), "--json", "--prices", str(own)]) == 0
    decision = json.loads(capsys.readouterr().out)
    assert decision["rule"] == "generic-cost-local"
    assert decision["costs"]["prices"]["file"] == str(own)


def test_malformed_price_file_is_a_clear_error(tmp_path, capsys):
    own = write_spec(tmp_path / "prices.yaml", "vision_api: {google: {per_1000: {paint: 1}}}\n")
    assert main(["decide", str(EXAMPLES / "invoice-ocr.yaml"), "--prices", str(own)]) == 2
    assert "malformed" in capsys.readouterr().err


def test_api_cost_counts_the_free_tier():
    from visionroute.decision.costs import api_monthly_cost
    from visionroute.spec import Task

    prices = load_prices()
    assert api_monthly_cost(prices, "google", Task.tag, 1000) == 0
    assert api_monthly_cost(prices, "google", Task.tag, 11_000) == pytest.approx(15.0)
    assert api_monthly_cost(prices, "aws", Task.ocr, 50_000) == pytest.approx(50.0)
    assert api_monthly_cost(prices, "azure", Task.detect_faces, 10) is None


def test_backends_command_lists_the_registry(capsys):
    assert main(["backends"]) == 0
    assert capsys.readouterr().out.split() == ["finetune", "scratch", "vision_api"]


def test_cache_lists_the_decoded_entries_and_prunes_to_a_size(isolated_state, tiny_dataset, capsys):
    from visionroute.data.dataset import assign_splits, scan_dataset
    from visionroute.training.cache import decode_to_cache
    from visionroute.training.engine import build_model
    from visionroute.training.preprocessing import Preprocessing

    dataset = assign_splits(scan_dataset(tiny_dataset), seed=0)
    prep = Preprocessing.for_model(
        build_model("resnet18_small", 2, input_size=32), "resnet18_small", dataset.classes, 3, 32
    )
    decoded = decode_to_cache(dataset, prep, isolated_state / "cache" / "decoded", progress=False)
    assert main(["cache"]) == 0
    listed = capsys.readouterr()
    assert decoded.folder.name in listed.out and f"{len(dataset.samples):,} images" in listed.out
    assert "1 entries" in listed.err
    assert main(["cache", "--max-gb", "0"]) == 0
    assert f"removed {decoded.folder.name}" in capsys.readouterr().out and not decoded.folder.exists()


def test_train_on_several_nodes_needs_the_rendezvous_and_the_process_count(tmp_path, capsys):
    spec = write_spec(
        tmp_path / "t.yaml", "name: t\ntask: classify\nroute: scratch\ndata: {labeled_examples: 5000}\n"
    )
    assert main(["train", str(spec), "--nnodes", "2", "--node-rank", "1"]) == 1
    error = capsys.readouterr().err
    assert "several nodes need --rdzv-endpoint HOST:PORT" in error and "--nproc-per-node N" in error
