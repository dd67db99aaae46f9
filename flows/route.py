"""The `route-image-task` Prefect flow: validate the spec, profile the data, decide, run the route, track.

Thin on purpose: every step calls plain functions (visionroute.planning, the backends) that the CLI and the
tests call too. Works in Prefect's ephemeral mode (no server configured) and against `prefect server start`.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from visionroute.backends import BackendContext, create_backend

from visionroute import tracking
from visionroute.cost_chart import plot_costs
from visionroute.data.dataset import DatasetError
from visionroute.data.validation import ValidationReport
from visionroute.decision.costs import load_prices
from visionroute.decision.report import cost_rows, decision_markdown
from visionroute.decision.rules import escalate
from visionroute.forms import RunOverrides, TaskForm, resolve_spec
from visionroute.planning import Plan, plan
from visionroute.prefect_api import crash_flow_runs
from visionroute.repair import repair
from visionroute.spec import load_spec


def _key(name: str, suffix: str) -> str:
    # Prefect artifact keys allow lowercase letters, digits and dashes only.
    return f"{name}-{suffix}"


def _publish_quarantine(name: str, report: ValidationReport) -> None:
    if report.quarantined:
        create_table_artifact(
            key=_key(name, "quarantine"),
            table=[{"path": s.path, "reason": s.reason} for s in report.quarantined],
            description=f"Files left out of training, with the reason ({len(report.quarantined)} of "
            f"{report.checked} checked)",
        )
    leaked = "leaked from test (" + ("removed)" if report.leakage_removed else "kept, reported)")
    findings = [{"kind": leaked, **row} for row in report.leaked_from_test]
    findings += [{"kind": "exact duplicate", **row} for group in report.exact_duplicates for row in group]
    findings += [
        {"kind": f"near duplicate (aligned distance {pair['distance']})", **pair["a"]}
        for pair in report.near_duplicates
    ]
    if findings:
        create_table_artifact(
            key=_key(name, "duplicates"),
            table=findings,
            description="Duplicate and leaked images found by sha256 and aligned thumbnail signatures",
        )


@task(name="plan-task", cache_policy=NO_CACHE)
def plan_task(spec_path: str, prices_path: str | None) -> Plan:
    """Validate the spec, check every image (quarantine, duplicates, leakage), profile the data and decide."""
    try:
        result = plan(spec_path, prices_path, check_images=True)
    except DatasetError as error:
        if getattr(error, "report", None) is not None:  # too many bad files: still show which and why
            _publish_quarantine(Path(spec_path).stem, error.report)
        raise
    logger = get_run_logger()
    if result.validation is not None:
        _publish_quarantine(result.spec.name, result.validation)
    if result.dataset is not None:
        profile = result.dataset.profile()
        logger.info(
            "data: %s labelled images, per class %s, %s skipped",
            profile["labeled_examples"],
            profile["per_class"],
            profile["skipped"],
        )
        create_table_artifact(
            key=_key(result.spec.name, "data-profile"),
            table=[{"split": split, **counts} for split, counts in profile["per_split"].items()],
            description=f"Labelled images per split and class; imbalance {profile['imbalance_ratio']}; sizes "
            f"{profile['width']} x {profile['height']}; modes {profile['modes']}; channels "
            f"{result.validation.channels if result.validation else 'n/a'}; bit depths "
            f"{result.validation.bit_depths if result.validation else 'n/a'}",
        )
    decision = result.decision
    logger.info("route %s by rule %s", decision.route, decision.rule)
    create_markdown_artifact(
        key=_key(result.spec.name, "decision"), markdown=decision_markdown(result.spec.name, decision)
    )
    create_table_artifact(
        key=_key(result.spec.name, "route-costs"),
        table=cost_rows(decision),
        description="Estimated cost of each route at the spec's monthly volume (USD)",
    )
    return result


def _parent_tags(result: Plan) -> dict:
    spec, decision = result.spec, result.decision
    return {
        "visionroute.route": decision.route,
        "visionroute.rule": decision.rule,
        "visionroute.provider": decision.provider,
        "visionroute.spec_hash": spec.digest(),
        "visionroute.forced": str(decision.forced).lower(),
        "prefect.flow_run_id": runtime.flow_run.id,
    }


@task(name="open-tracking", cache_policy=NO_CACHE)
def open_tracking(result: Plan, run_id: str, spec_path: str, prices_path: str | None) -> None:
    """Fill the parent MLflow run: decision and spec as artifacts, the data profile and validation."""
    client = tracking.configure()
    spec, decision = result.spec, result.decision
    client.log_artifact(run_id, spec_path, "spec")
    tracking.log_json(client, run_id, decision.to_dict(), "decision.json")
    tracking.log_text(client, run_id, decision_markdown(spec.name, decision), "decision.md")
    with tempfile.TemporaryDirectory() as folder:
        chart = plot_costs(
            decision, load_prices(prices_path), Path(folder) / "costs.png", f"{spec.name}: cost per route"
        )
        client.log_artifact(run_id, str(chart))
    if result.dataset is not None:
        tracking.log_json(client, run_id, result.dataset.profile(), "data/profile.json")
        if result.validation is not None:
            tracking.log_json(client, run_id, result.validation.to_dict(), "data/validation.json")
            client.log_metric(run_id, "quarantined_files", len(result.validation.quarantined))
            leaked = len(result.validation.leaked_from_test)
            client.log_metric(run_id, "leaked_test_images", leaked)
            client.set_tag(
                run_id, "visionroute.leakage", "removed" if result.validation.leakage_removed else "reported"
            )
        tracking.log_json(
            client,
            run_id,
            [{"path": s.path, "reason": s.reason} for s in result.dataset.skipped],
            "data/skipped.json",
        )


@task(name="repair", cache_policy=NO_CACHE)
def repair_task(name: str) -> list[dict]:
    """Close what a killed run of this task left behind: its runs become KILLED, half-registered versions go."""
    actions = repair([name])
    if actions:
        get_run_logger().warning("repaired what an earlier, killed run left: %s", actions)
    crash_flow_runs([a["prefect_flow_run_id"] for a in actions if a.get("prefect_flow_run_id")])
    return actions


@flow(name="run-backend", flow_run_name="{route}")
def run_backend(
    route: str,
    result: Plan,
    parent_run_id: str,
    prices_path: str | None = None,
    progress_id: str | None = None,
) -> dict:
    """The chosen route's backend, as a sub-flow; it moves the progress bar of the run the user triggered."""
    spec = result.spec

    def on_progress(record: dict) -> None:
        done, total = (
            (record["done"], record["total"]) if "done" in record else (record["epoch"], record["epochs"])
        )
        if progress_id:
            update_progress_artifact(progress_id, progress=PLANNED + (DONE - PLANNED) * done / max(1, total))

    work_dir = tracking.state_dir() / "runs" / parent_run_id
    context = BackendContext(
        spec, result.decision, result.dataset, parent_run_id, work_dir, on_progress, prices_path
    )
    outcome = create_backend(route).run(context)
    create_table_artifact(
        key=_key(spec.name, "result"),
        table=[{"metric": key, "value": value} for key, value in sorted(outcome.metrics.items())],
        description=outcome.summary,
    )
    return outcome.__dict__


@task(name="fit-test", cache_policy=NO_CACHE)
def fit_test_task(result: Plan, parent_run_id: str, prices_path: str | None) -> Plan:
    """Before a label-map API route: measure the API on a labelled sample; below target_accuracy, escalate to
    the route the rules give without the label_map, and record why on the parent run."""
    from visionroute.vision.fit_test import fit_test

    spec, decision = result.spec, result.decision
    prices = load_prices(prices_path)
    fit = fit_test(spec, result.dataset, decision.provider, prices, parent_run_id=parent_run_id)
    logger = get_run_logger()
    logger.info("fit test: %s accuracy %.3f on %d images", fit["provider"], fit["accuracy"], fit["images"])
    create_table_artifact(
        key=_key(spec.name, "fit-test"),
        table=[{"class": name, **figures} for name, figures in fit["per_class"].items()],
        description=f"{fit['provider']} through the label_map: accuracy {fit['accuracy']} on {fit['images']} "
        f"images (target {spec.vision_api.target_accuracy}), {fit['unmapped']} unmapped",
    )
    client = tracking.configure()
    tracking.log_json(client, parent_run_id, fit, "fit_test.json")
    client.log_metric(parent_run_id, "fit_accuracy", fit["accuracy"])
    if fit["accuracy"] >= spec.vision_api.target_accuracy:
        return result
    escalated = escalate(decision, fit, spec, result.summary, prices)
    logger.warning("escalating: %s", escalated.reasons[0])
    for key, value in {
        "visionroute.route": escalated.route,
        "visionroute.rule": escalated.rule,
        "visionroute.escalated_from": decision.route,
    }.items():
        client.set_tag(parent_run_id, key, value)
    tracking.log_json(client, parent_run_id, escalated.to_dict(), "decision.json")
    tracking.log_text(client, parent_run_id, decision_markdown(spec.name, escalated), "decision.md")
    create_markdown_artifact(
        key=_key(spec.name, "decision"), markdown=decision_markdown(spec.name, escalated)
    )
    return replace(result, decision=escalated)


# The triggered run's progress bar: planning (validation, profiling, domain measurement) to PLANNED, the
# backend's epochs or images to DONE, tracking and registration to 100.
PLANNED, DONE = 10.0, 95.0


def _publish_links(name: str, parent_run_id: str, outcome: dict) -> None:
    """Where to look in MLflow: link artifacts when MLflow is a server (its UI), markdown ids otherwise."""
    client = tracking.configure()
    experiment = client.get_run(parent_run_id).info.experiment_id
    ui = tracking.ui_url()
    version = outcome.get("model_version")
    if ui:
        create_link_artifact(
            key=_key(name, "mlflow-run"),
            link=f"{ui}/#/experiments/{experiment}/runs/{parent_run_id}",
            link_text=f"MLflow run {parent_run_id}",
            description="This run in MLflow: decision, spec, data profile, the backend's nested run",
        )
        if version:
            create_link_artifact(
                key=_key(name, "model-version"),
                link=f"{ui}/#/models/{outcome['model_name']}/versions/{version}",
                link_text=f"{outcome['model_name']} version {version}",
                description="The registered version: description, aliases, comparison with the champion",
            )
        return
    lines = [f"MLflow store `{tracking.tracking_uri()}`, experiment {experiment}, run `{parent_run_id}`"]
    if version:
        lines.append(f"registered version `models:/{outcome['model_name']}/{version}`")
    create_markdown_artifact(key=_key(name, "mlflow"), markdown="\n\n".join(lines))


@flow(name="route-image-task", log_prints=True)
def route_image_task(
    spec_path: str = "",
    prices_path: str = "",
    task: TaskForm = TaskForm(),  # noqa: B008 (frozen: the shared default cannot change)
    overrides: RunOverrides = RunOverrides(),  # noqa: B008
) -> dict:
    """Route one image task end to end; returns the decision and the backend's result.

    Args:
        spec_path: An existing task spec file on the worker, relative to the repository root, e.g.
            examples/tasks/ants-vs-bees.yaml. Leave empty to route the task filled in below instead.
        prices_path: A price file of your own (empty: VISIONROUTE_PRICES or the bundled prices.yaml).
        task: A new task, filled in here instead of a spec file (used only when spec_path is empty).
        overrides: Changes for this run only: a shorter budget, fewer epochs, a forced route.
    """
    prices_path = prices_path or None
    client = tracking.check_store()  # seconds: a store that cannot be used fails before any data is read
    work = tracking.state_dir()
    spec_path = str(resolve_spec(spec_path, task, overrides, work / "specs", Path.cwd()))
    name = load_spec(spec_path).name
    progress_id = str(
        create_progress_artifact(
            progress=0.0,
            key=_key(name, "progress"),
            description=f"{name}: planning to {PLANNED:.0f}%, training or annotation to {DONE:.0f}%, then tracking",
        )
    )
    result = plan_task(spec_path, prices_path)
    update_progress_artifact(progress_id, progress=PLANNED)
    repair_task(result.spec.name)
    # One lifecycle: whatever fails from here on (tracking itself included) leaves the run FAILED with the error.
    with tracking.run(
        client, result.spec.name, f"route-{result.decision.route}", _parent_tags(result)
    ) as run_id:
        open_tracking(result, run_id, spec_path, prices_path)
        decision = result.decision
        if (
            decision.route == "vision_api"
            and result.spec.classify_by_api
            and result.spec.vision_api.target_accuracy
        ):
            if result.dataset is None:
                raise DatasetError("a target_accuracy needs labelled images for the fit test: set data.path")
            result = fit_test_task(result, run_id, prices_path)
        outcome = run_backend(result.decision.route, result, run_id, prices_path, progress_id)
        tracking.log_json(client, run_id, outcome, "result.json")
    _publish_links(result.spec.name, run_id, outcome)
    update_progress_artifact(progress_id, progress=100.0)
    print(outcome["summary"])
    return {
        "decision": result.decision.to_dict(),
        "result": outcome,
        "parent_run_id": run_id,
        "tracking_uri": tracking.tracking_uri(),
    }
