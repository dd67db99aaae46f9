"""The decision framework as a table: every rule and every threshold boundary."""

from __future__ import annotations

import time

import pytest

from visionroute.decision.costs import load_prices
from visionroute.decision.policy import DEFAULT_POLICY, Policy
from visionroute.decision.rules import CannotDecide, DataSummary, decide, escalate
from visionroute.spec import parse_spec

PRICES = load_prices()
ENOUGH = DEFAULT_POLICY.sufficient_for_scratch


def spec(
    task="classify",
    domain="natural",
    examples=None,
    volume=1000,
    private=False,
    proven=False,
    route="auto",
    **extra,
):
    raw = {
        "name": "t",
        "task": task,
        "domain": domain,
        "constraints": {"external_api_allowed": not private, "monthly_volume": volume, "proven_need": proven},
        "route": route,
        **extra,
    }
    if examples is not None:
        raw["data"] = {"labeled_examples": examples}
    return parse_spec(raw)


def two_classes(total: int) -> DataSummary:
    return DataSummary(total, {"a": total - total // 2, "b": total // 2})


LABEL_MAP = {"label_map": {"a": ["Cat"], "b": ["Dog"]}, "target_accuracy": 0.9}

# (id, spec kwargs, examples, expected route, provider, rule)
TABLE = [
    # Rule 1: generic tasks go to the cheapest API while it is cheaper than self-hosting.
    ("tag-low-volume", dict(task="tag", volume=10_000), 0, "vision_api", "aws", "generic-api"),
    ("ocr-low-volume", dict(task="ocr", volume=10_000), 0, "vision_api", "aws", "generic-api"),
    ("objects", dict(task="detect_objects", volume=10_000), 0, "vision_api", "aws", "generic-api"),
    ("faces", dict(task="detect_faces", volume=10_000), 0, "vision_api", "aws", "generic-api"),
    ("ocr-free-tier-google", dict(task="ocr", volume=800), 0, "vision_api", "google", "generic-api"),
    # 1a: privacy.
    ("private-no-labels", dict(task="tag", private=True), 0, "vision_api", "local", "generic-private-local"),
    (
        "private-with-labels",
        dict(task="tag", private=True),
        500,
        "finetune",
        None,
        "generic-private-finetune",
    ),
    # 1b: API cost above self-hosting.
    ("costly-no-labels", dict(task="tag", volume=5_000_000), 0, "vision_api", "local", "generic-cost-local"),
    (
        "costly-with-labels",
        dict(task="tag", volume=5_000_000),
        800,
        "finetune",
        None,
        "generic-cost-finetune",
    ),
    # 1b without anything local to serve it: the on-premises provider tags and reads text only.
    (
        "costly-faces-no-labels",
        dict(task="detect_faces", volume=5_000_000),
        0,
        "vision_api",
        "aws",
        "generic-cost-api",
    ),
    # Rule 2: specific, ImageNet-like -> finetune whatever the size.
    ("natural-small", dict(domain="natural"), 245, "finetune", None, "specific-imagenet-like-finetune"),
    ("product-9999", dict(domain="product"), 9_999, "finetune", None, "specific-imagenet-like-finetune"),
    ("medical-10000", dict(domain="medical"), 10_000, "finetune", None, "specific-imagenet-like-finetune"),
    (
        "satellite-huge",
        dict(domain="satellite"),
        500_000,
        "finetune",
        None,
        "specific-imagenet-like-finetune",
    ),
    ("industrial", dict(domain="industrial"), 1_800, "finetune", None, "specific-imagenet-like-finetune"),
    ("document", dict(domain="document"), 3_000, "finetune", None, "specific-imagenet-like-finetune"),
    ("other", dict(domain="other"), 3_000, "finetune", None, "specific-imagenet-like-finetune"),
    # Rule 3: far domain, boundary at 20,000.
    ("radar-19999", dict(domain="radar"), ENOUGH - 1, "finetune", None, "specific-far-small-finetune"),
    ("radar-20000", dict(domain="radar"), ENOUGH, "scratch", None, "specific-far-large-scratch"),
    ("microscopy-200k", dict(domain="microscopy"), 200_000, "scratch", None, "specific-far-large-scratch"),
    ("volumetric-small", dict(domain="volumetric"), 300, "finetune", None, "specific-far-small-finetune"),
    # Rule 4: proven need, boundary at 20,000.
    ("proven-19999", dict(proven=True), ENOUGH - 1, "finetune", None, "proven-need-insufficient-finetune"),
    ("proven-20000", dict(proven=True), ENOUGH, "scratch", None, "proven-need-scratch"),
    (
        "proven-far-19999",
        dict(domain="radar", proven=True),
        ENOUGH - 1,
        "finetune",
        None,
        "proven-need-insufficient-finetune",
    ),
    # Rule 6: forced routes are honoured.
    ("forced-scratch", dict(route="scratch"), 500, "scratch", None, "forced-scratch"),
    (
        "forced-finetune-far",
        dict(domain="radar", route="finetune"),
        50_000,
        "finetune",
        None,
        "forced-finetune",
    ),
    (
        "forced-api",
        dict(task="ocr", volume=5_000_000, route="vision_api"),
        800,
        "vision_api",
        "aws",
        "forced-vision_api",
    ),
    ("forced-same-as-auto", dict(route="finetune"), 500, "finetune", None, "specific-imagenet-like-finetune"),
    # A classify task whose classes map onto generic labels: the API while it is allowed, cheaper and not
    # overruled by a proven need; otherwise the rules above as if there were no map.
    ("label-map-api", dict(vision_api=LABEL_MAP), 500, "vision_api", "google", "specific-label-map-api"),
    (
        "label-map-private",
        dict(vision_api=LABEL_MAP, private=True),
        500,
        "finetune",
        None,
        "specific-imagenet-like-finetune",
    ),
    (
        "label-map-costly",
        dict(vision_api=LABEL_MAP, volume=5_000_000),
        500,
        "finetune",
        None,
        "specific-imagenet-like-finetune",
    ),
    (
        "label-map-proven-need",
        dict(vision_api=LABEL_MAP, proven=True),
        ENOUGH,
        "scratch",
        None,
        "proven-need-scratch",
    ),
    (
        "label-map-no-data",
        dict(vision_api=LABEL_MAP, volume=9000),
        0,
        "vision_api",
        "aws",
        "specific-label-map-api",
    ),
]


@pytest.mark.parametrize(
    ("case", "kwargs", "examples", "route", "provider", "rule"), TABLE, ids=[t[0] for t in TABLE]
)
def test_rule_table(case, kwargs, examples, route, provider, rule):
    decision = decide(spec(**kwargs), two_classes(examples) if examples else DataSummary(0), PRICES)
    assert (decision.route, decision.provider, decision.rule) == (route, provider, rule)
    assert decision.reasons and all(isinstance(r, str) and r for r in decision.reasons)
    assert {item["route"] for item in decision.rejected} == {"vision_api", "finetune", "scratch"} - {route}
    assert all(item["why"] for item in decision.rejected)
    assert set(decision.costs) >= {"vision_api", "finetune", "scratch"}


def test_warnings_name_the_concern():
    far = decide(spec(domain="radar"), two_classes(5_000), PRICES)
    assert any("transfer weakly" in w and "domain-pretrained" in w for w in far.warnings)
    other = decide(spec(domain="other"), two_classes(5_000), PRICES)
    assert any("'other' is treated as ImageNet-like" in w for w in other.warnings)
    proven = decide(spec(proven=True), two_classes(1_000), PRICES)
    assert any("not enough" in w or "fewer than" in w for w in proven.warnings)
    forced = decide(spec(route="scratch"), two_classes(500), PRICES)
    assert forced.forced and forced.auto_rule == "specific-imagenet-like-finetune"
    assert "would have chosen 'finetune'" in forced.reasons[1]
    assert any("from scratch on 500" in w for w in forced.warnings)


def test_far_domain_with_registered_checkpoint_finetunes_from_it():
    policy = Policy(domain_checkpoints={"radar": "models:/radar-backbone@champion"})
    decision = decide(spec(domain="radar"), two_classes(ENOUGH), PRICES, policy)
    assert (decision.route, decision.rule) == ("finetune", "specific-far-large-domain-finetune")
    assert "models:/radar-backbone@champion" in decision.reasons[0]


def test_specific_task_without_data_says_what_to_provide():
    with pytest.raises(CannotDecide, match="set data.path"):
        decide(spec(), DataSummary(0), PRICES)


@pytest.mark.parametrize(("count", "outcome"), [(4, "error"), (5, "warning"), (99, "warning"), (100, "ok")])
def test_per_class_thresholds(count, outcome):
    summary = DataSummary(count + 300, {"few": count, "many": 300})
    if outcome == "error":
        with pytest.raises(CannotDecide, match="class 'few' has 4 labelled image"):
            decide(spec(), summary, PRICES)
        return
    decision = decide(spec(), summary, PRICES)
    warned = any("class 'few'" in w for w in decision.warnings)
    assert warned == (outcome == "warning")


def test_single_class_is_an_error():
    with pytest.raises(CannotDecide, match="only one class"):
        decide(spec(), DataSummary(50, {"only": 50}), PRICES)


def test_class_counts_do_not_matter_for_the_api_route():
    decision = decide(spec(task="tag", volume=1000), DataSummary(3, {"x": 3}), PRICES)
    assert decision.route == "vision_api"


def test_api_versus_self_hosting_boundary_is_the_break_even_volume():
    generic = spec(task="tag", volume=1000)
    break_even = decide(generic, DataSummary(0), PRICES).costs["break_even_monthly_volume"]
    below = decide(spec(task="tag", volume=break_even - 1), DataSummary(0), PRICES)
    at = decide(spec(task="tag", volume=break_even), DataSummary(0), PRICES)
    assert below.rule == "generic-api"
    assert at.rule == "generic-cost-local"


def test_forcing_api_on_a_specific_task_is_refused():
    with pytest.raises(CannotDecide, match="no Vision API knows"):
        decide(spec(route="vision_api"), two_classes(500), PRICES)


def test_forced_api_under_privacy_runs_locally():
    decision = decide(
        spec(task="tag", private=True, route="vision_api"), DataSummary(300, {"a": 150, "b": 150}), PRICES
    )
    assert (decision.route, decision.provider) == ("vision_api", "local")


def test_decide_is_pure_and_fast():
    """1,000 decisions, spec validation included, well under the 2 s the benchmark asks for (not a timing test:
    the bound is 10x loose, it guards against an accidental I/O or import in the loop)."""
    started = time.perf_counter()
    for index in range(1000):
        decide(spec(domain="radar" if index % 2 else "natural", examples=1000 + index), None, PRICES)
    assert time.perf_counter() - started < 20


def test_decision_module_imports_neither_prefect_nor_mlflow():
    import ast
    from pathlib import Path

    package = Path(__file__).parents[1] / "visionroute" / "decision"
    for path in sorted(package.glob("*.py")):
        module = path.name
        tree = ast.parse(path.read_text())
        names = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
        }
        assert not names & {"prefect", "mlflow", "torch"}, module


def test_the_spec_may_name_the_provider():
    named = decide(spec(task="ocr", volume=10_000, vision_api={"provider": "azure"}), DataSummary(0), PRICES)
    assert (named.route, named.provider) == ("vision_api", "azure")
    assert any("names 'azure' (the cheapest would be 'aws')" in reason for reason in named.reasons)
    local = decide(spec(task="tag", vision_api={"provider": "local"}), DataSummary(0), PRICES)
    assert local.provider == "local"


def test_a_named_cloud_provider_cannot_override_privacy():
    with pytest.raises(CannotDecide, match="external_api_allowed is false"):
        decide(spec(task="tag", private=True, vision_api={"provider": "google"}), DataSummary(0), PRICES)


def test_a_named_provider_must_offer_the_feature():
    with pytest.raises(CannotDecide, match="'azure' does not offer 'detect_faces'"):
        decide(spec(task="detect_faces", vision_api={"provider": "azure"}), DataSummary(0), PRICES)


def test_label_map_classify_is_priced_as_tagging():
    decision = decide(spec(vision_api=LABEL_MAP, volume=20_000), two_classes(500), PRICES)
    api = decision.costs["vision_api"]
    assert api["applicable"] and api["feature"] == "tag" and api["monthly_usd"] == 20.0
    assert any("fit test" in reason for reason in decision.reasons)


def test_escalation_records_the_fit_and_falls_back_to_the_rules():
    label_spec = spec(vision_api=LABEL_MAP, domain="radar")
    summary = two_classes(ENOUGH)
    api = decide(label_spec, summary, PRICES)
    fit = {"provider": "aws", "accuracy": 0.61, "images": 100, "run_id": "r1"}
    escalated = escalate(api, fit, label_spec, summary, PRICES)
    assert (escalated.route, escalated.rule, escalated.auto_rule) == (
        "scratch",
        "escalated-scratch",
        "specific-far-large-scratch",
    )
    assert "accuracy 0.610 on a 100-image fit test, below target_accuracy 0.9" in escalated.reasons[0]
    assert escalated.escalation == {
        "from_route": "vision_api",
        "from_rule": "specific-label-map-api",
        "provider": "aws",
        "fit_accuracy": 0.61,
        "target_accuracy": 0.9,
        "fit_images": 100,
        "fit_run_id": "r1",
    }


def test_label_map_must_match_the_classes():
    from visionroute.spec import SpecError

    with pytest.raises(SpecError, match="must map exactly the classes"):
        spec(classes=["a", "b"], vision_api={"label_map": {"a": ["Cat"]}})
    with pytest.raises(SpecError, match="needs 'vision_api.label_map'"):
        spec(vision_api={"target_accuracy": 0.9})


def test_what_nothing_on_premises_serves_cannot_stay_on_premises():
    with pytest.raises(CannotDecide, match="serves ocr, tag only and there is no labelled data"):
        decide(spec(task="detect_faces", private=True), DataSummary(0), PRICES)
    with pytest.raises(CannotDecide, match="serves ocr, tag only, not 'detect_objects'"):
        decide(spec(task="detect_objects", vision_api={"provider": "local"}), DataSummary(0), PRICES)
    costly = decide(spec(task="detect_faces", volume=5_000_000), DataSummary(0), PRICES)
    assert any("self-hosting would be cheaper" in w for w in costly.warnings)


def test_local_tasks_match_what_the_local_provider_serves():
    from visionroute.decision.rules import LOCAL_TASKS
    from visionroute.vision.base import ProviderSettings
    from visionroute.vision.local import LocalProvider

    assert {t.value for t in LOCAL_TASKS} == LocalProvider(
        ProviderSettings()
    ).features()  # tesseract installed


def test_escalating_a_forced_api_route_lets_the_rules_choose_training():
    forced = spec(vision_api=LABEL_MAP, route="vision_api")
    summary = two_classes(500)
    api = decide(forced, summary, PRICES)
    escalated = escalate(api, {"provider": "google", "accuracy": 0.2, "images": 50}, forced, summary, PRICES)
    assert (escalated.route, escalated.rule) == ("finetune", "escalated-finetune")


def test_settings_the_provider_does_not_read_are_flagged():
    decision = decide(
        spec(
            task="ocr", volume=10_000, vision_api={"provider": "azure", "transport": "rest", "s3_bucket": "b"}
        ),
        DataSummary(0),
        PRICES,
    )
    assert (
        "vision_api.transport applies to provider google only; it is ignored for azure" in decision.warnings
    )
    assert "vision_api.s3_bucket applies to provider aws only; it is ignored for azure" in decision.warnings


def test_a_label_map_under_privacy_says_it_is_not_used():
    decision = decide(spec(vision_api=LABEL_MAP, private=True), two_classes(500), PRICES)
    assert decision.route == "finetune"
    assert any("label_map is not used" in w for w in decision.warnings)


@pytest.mark.parametrize(
    "budget_minutes, device, expected",
    [
        # 240 images, three epochs in 80% of the budget. Planning rates (img/s), fp32 / bf16 CPU: lite0 13 / 20,
        # lite1 11 / 14, lite2 9 / 12.
        (1.2, "cpu", "tf_efficientnet_lite0"),
        (1.2, "cpu_bf16", "tf_efficientnet_lite1"),
        (1.5, "cpu", "tf_efficientnet_lite1"),
        (1.5, "cpu_bf16", "tf_efficientnet_lite2"),  # a bf16 CPU trains faster: the larger model fits
        (2.0, "cpu", "tf_efficientnet_lite2"),
        (0.1, "cpu_bf16", "tf_efficientnet_lite0"),  # nothing fits: the smallest, not nothing
        (0.1, "gpu", "tf_efficientnet_lite2"),  # a GPU trains 240 images in seconds
    ],
)
def test_the_auto_model_is_the_largest_that_fits_the_budget_on_the_device_that_trains(
    budget_minutes, device, expected
):
    task = spec(domain="natural", training={"model": "auto", "budget_minutes": budget_minutes})
    decision = decide(task, two_classes(240), PRICES, device=device)
    assert (decision.route, decision.model) == ("finetune", expected)
    assert decision.costs["finetune"]["model"] == expected  # the model priced is the model trained
    assert decision.inputs["training_device"] == device


def test_an_escalation_plans_for_the_device_the_first_decision_planned_for():
    forced = spec(vision_api=LABEL_MAP, route="vision_api", training={"budget_minutes": 1.2})
    summary = two_classes(240)
    fit = {"provider": "google", "accuracy": 0.2, "images": 50}
    for device, model in (("cpu", "tf_efficientnet_lite0"), ("gpu", "tf_efficientnet_lite2")):
        escalated = escalate(decide(forced, summary, PRICES, device=device), fit, forced, summary, PRICES)
        assert (escalated.route, escalated.model) == ("finetune", model)


def test_an_unknown_training_device_is_a_clear_error_whatever_the_model():
    for training in ({"model": "auto"}, {"model": "resnet18"}):
        with pytest.raises(ValueError, match="training device 'tpu': use one of gpu, cpu_bf16, cpu"):
            decide(spec(domain="natural", training=training), two_classes(240), PRICES, device="tpu")


def test_small_native_inputs_train_the_small_input_cnn_from_scratch_on_any_device_and_budget():
    from visionroute.training.catalogue import choose_model

    for device in ("gpu", "cpu_bf16", "cpu"):
        for budget in (0.1, 600):
            chosen = {
                size: choose_model("scratch", 50_000, budget, device=device, hub=False, native_size=size)
                for size in (28, 64, 65, 0)
            }
            assert chosen == {28: "resnet18_small", 64: "resnet18_small", 65: "resnet18", 0: "resnet18"}


def test_flows_folder_holds_prefect_flows_only():
    from pathlib import Path

    folder = Path(__file__).parents[1] / "flows"
    for path in folder.glob("*.py"):
        if path.name != "__init__.py":
            assert "@flow" in path.read_text(), f"{path.name} holds no Prefect flow: move it out of flows/"
