"""What a reviewer reads and decides in the MLflow registry: version and model descriptions, promotion and
rollback by a named person with a reason, and an append-only history of the `champion` alias.

MLflow keeps no alias history (mlflow/mlflow#2169), so each change of `champion` is appended to the registered
model's tag `visionroute.alias_history` (a JSON list) and shown as a table in the model's description; the
versions involved carry the review as tags. `champion_on(name, when)` answers "which version was in
production on date X, and who decided".
"""

from __future__ import annotations

import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from visionroute import tracking

CHAMPION = "champion"
HISTORY_TAG = "visionroute.alias_history"
AUTOMATIC = "visionroute (automatic)"


class ReviewError(ValueError):
    """A promotion or rollback that cannot be done; the message names the fix."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def history(client: MlflowClient, name: str) -> list[dict]:
    """Every change of `champion` for this model, oldest first."""
    tags = _registered(client, name).tags
    return json.loads(tags.get(HISTORY_TAG, "[]"))


def _registered(client: MlflowClient, name: str):
    try:
        return client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        raise ReviewError(
            f"no registered model {name!r} in {tracking.tracking_uri()}; train it first (visionroute run SPEC)"
        ) from None


def _champion(client: MlflowClient, name: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except mlflow.exceptions.MlflowException:
        return None


def _append(client: MlflowClient, name: str, entry: dict) -> list[dict]:
    entries = history(client, name) + [entry]
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(entries))
    return entries


def champion_on(client: MlflowClient, name: str, when: datetime) -> dict | None:
    """The history entry that made the champion of `when` (version, reviewer, reason, time), or None."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = None
    for entry in history(client, name):
        if datetime.fromisoformat(entry["time"]) <= when:
            current = entry
    return current


def _check_evaluated(client: MlflowClient, name: str, version: str):
    try:
        found = client.get_model_version(name, version)
    except mlflow.exceptions.MlflowException:
        raise ReviewError(
            f"{name} has no version {version}; `visionroute history {name}` lists them"
        ) from None
    tags = found.tags
    # `promoted` is the last tag the registration writes: without it, the version's evaluation against the
    # champion never finished (the run died, or it is still running).
    if "test_accuracy" not in tags or "promoted" not in tags or found.status != "READY":
        raise ReviewError(
            f"{name} version {version} never completed its evaluation (no test_accuracy/promoted tags, status "
            f"{found.status}); promote a version whose run finished, or re-run the task"
        )
    return found


def _move_champion(
    client: MlflowClient, name: str, version: str, reviewer: str, reason: str, action: str
) -> dict:
    if not reviewer.strip() or not reason.strip():
        raise ReviewError("a promotion needs the reviewer's name and a reason (--reviewer, --reason)")
    previous = _champion(client, name)
    if previous == version:
        raise ReviewError(f"{name} version {version} is already champion; nothing to change")
    entry = {
        "time": _now(),
        "alias": CHAMPION,
        "version": version,
        "previous": previous,
        "reviewer": reviewer,
        "reason": reason,
        "action": action,
    }
    client.set_registered_model_alias(name, CHAMPION, version)
    for key, value in {
        "review.action": action,
        "review.reviewer": reviewer,
        "review.reason": reason,
        "review.time": entry["time"],
        "review.previous_champion": previous or "none",
        "review.new_champion": version,
    }.items():
        client.set_model_version_tag(name, version, key, value)
    if previous:
        client.set_model_version_tag(name, previous, "review.replaced_by", version)
        client.set_model_version_tag(name, previous, "review.replaced_at", entry["time"])
    _append(client, name, entry)
    describe_model(client, name)
    return entry


def promote(client: MlflowClient, name: str, version: str, reviewer: str, reason: str) -> dict:
    """Move `champion` to a version a person chose; returns the history entry."""
    _registered(client, name)
    _check_evaluated(client, name, str(version))
    return _move_champion(client, name, str(version), reviewer, reason, "promote")


def rollback(client: MlflowClient, name: str, reviewer: str, reason: str) -> dict:
    """Move `champion` back to the version it replaced."""
    _registered(client, name)
    current = _champion(client, name)
    if current is None:
        raise ReviewError(f"{name} has no champion to roll back")
    made = [e for e in history(client, name) if e["version"] == current and e["previous"]]
    if not made:
        raise ReviewError(
            f"{name} version {current} replaced no earlier champion; promote a version by number"
        )
    target = made[-1]["previous"]
    _check_evaluated(client, name, target)
    return _move_champion(client, name, target, reviewer, reason, "rollback")


def record_automatic(client: MlflowClient, name: str, version: str, previous: str | None, why: str) -> None:
    """A registration that crowned its version by the comparison rule: the history says so, and who (no one)."""
    entry = {
        "time": _now(),
        "alias": CHAMPION,
        "version": str(version),
        "previous": previous,
        "reviewer": AUTOMATIC,
        "reason": why,
        "action": "automatic",
    }
    _append(client, name, entry)


def run_json(client: MlflowClient, run_id: str, path: str) -> object | None:
    try:
        with tempfile.TemporaryDirectory() as folder:
            local = client.download_artifacts(run_id, path, folder)
            return json.loads(Path(local).read_text())
    except Exception:  # an artifact a run never logged: the description says so instead
        return None


def _digest(rows: list[dict]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


def _decision(client: MlflowClient, run) -> dict:
    """The routing decision (decision.json) logged on the training run's parent run, or {}."""
    parent = run.data.tags.get("mlflow.parentRunId")
    decision = run_json(client, parent, "decision.json") if parent else None
    return decision if isinstance(decision, dict) else {}


def version_description(client: MlflowClient, name: str, version: str, comparison: dict, tags: dict) -> str:
    """Markdown for a reviewer: route and rule, test metrics beside the champion's on the same split, where the
    confusion matrix is, the data and split digests, and the decision's warnings."""
    found = client.get_model_version(name, version)
    run = client.get_run(found.run_id)
    metrics = run.data.metrics
    parent = run.data.tags.get("mlflow.parentRunId")
    decision = _decision(client, run)
    split = run_json(client, found.run_id, "data/split.json")
    champion = comparison.get("champion") or {}
    challenger = comparison.get("challenger", {})
    # The registration's one-line summary (accuracy with its interval) stays first: readers and lists show it.
    lines = [found.description, ""] if found.description else []
    lines += [
        f"## {name} v{version}: {'champion' if comparison.get('promoted') else 'challenger'}",
        "",
        f"**Route** `{tags.get('route', '?')}` by rule `{tags.get('rule', '?')}`; model `{tags.get('model', '?')}`, "
        f"weights {tags.get('weights', '?')}.",
        "",
        f"**Decision:** {comparison.get('why', '')}",
        "",
        "| test split | this version | champion"
        + (f" v{champion['version']}" if champion.get("version") else "")
        + " |",
        "|---|---|---|",
    ]
    for key in ("accuracy", "macro_f1"):
        theirs = champion.get(key)
        lines.append(
            f"| {key} | {challenger.get(key, float('nan')):.4f} | "
            + (f"{theirs:.4f}" if isinstance(theirs, float) else "n/a (no comparable champion)")
            + " |"
        )
    if "test_balanced_accuracy" in metrics:
        lines.append(f"| balanced accuracy | {metrics['test_balanced_accuracy']:.4f} | |")
    lines += [
        "",
        f"Both scored on the same test split, sha `{comparison.get('test_split', '?')}`"
        + (f" ({sum(1 for r in split['rows'] if r['split'] == 'test')} images)" if split else "")
        + ".",
        f"- confusion matrix: `runs:/{found.run_id}/evaluation/confusion_matrix.png`",
        f"- data split (train/val/test) sha `{_digest(split['rows']) if split else 'n/a'}`, in "
        f"`runs:/{found.run_id}/data/split.json`",
        f"- training run `{found.run_id}`" + (f", parent run `{parent}`" if parent else ""),
    ]
    warnings = decision.get("warnings", [])
    lines += ["", "**Warnings**" if warnings else "**Warnings:** none"]
    lines += [f"- {warning}" for warning in warnings]
    return "\n".join(lines)


def describe_model(client: MlflowClient, name: str) -> None:
    """The registered model's description: the task, how to use the champion, and who crowned which version."""
    registered = _registered(client, name)
    task = registered.tags.get("visionroute.task", "image classification")
    lines = [
        f"# {name}",
        "",
        f"visionroute task **{name}** ({task}). Versions are trained by the `route-image-task` flow; the alias "
        "`champion` is the version in production, `challenger` the latest one trained.",
        "",
        "Label images with the champion:",
        "",
        f"    .venv/bin/visionroute predict --model models:/{name}@champion FOLDER --out predictions.jsonl",
        "",
        "or run the Prefect deployment `predict/predict` with `model` set to "
        f"`models:/{name}@champion`. Promote or roll back with the `review-model` deployment or "
        f"`visionroute promote {name} VERSION --reviewer NAME --reason TEXT`.",
    ]
    entries = json.loads(registered.tags.get(HISTORY_TAG, "[]"))
    if entries:
        lines += ["", _history_table(entries)]
    client.update_registered_model(name, description="\n".join(lines))


def _history_table(entries: list[dict]) -> str:
    lines = [
        "## Champion history (newest first)",
        "",
        "| since (UTC) | version | previous | by | action | reason |",
        "|---|---|---|---|---|---|",
    ]
    for entry in reversed(entries):
        reason = entry["reason"].replace("|", "/").replace("\n", " ")
        previous = f"v{entry['previous']}" if entry["previous"] else "-"
        lines.append(
            f"| {entry['time']} | v{entry['version']} | {previous} | {entry['reviewer']} | {entry['action']} "
            f"| {reason} |"
        )
    return "\n".join(lines)


def history_markdown(client: MlflowClient, name: str) -> str:
    """The alias history as a markdown table, for the review flow's artifact."""
    return f"# {name}\n\n" + _history_table(history(client, name))


def record_registration(client: MlflowClient, name: str, version: str, comparison: dict, tags: dict) -> None:
    """After a registration: the version's description, the model's, and an automatic promotion's history."""
    inputs = _decision(client, client.get_run(client.get_model_version(name, version).run_id)).get(
        "inputs", {}
    )
    if inputs.get("per_class"):
        task = (
            f"{inputs.get('task', 'classify')} into {', '.join(inputs['per_class'])}; "
            f"{inputs.get('labeled_examples', '?')} labelled images, domain {inputs.get('domain', '?')}"
        )
        client.set_registered_model_tag(name, "visionroute.task", task)
    client.update_model_version(
        name, version, description=version_description(client, name, version, comparison, tags)
    )
    if comparison.get("promoted"):
        champion = comparison.get("champion") or {}
        record_automatic(client, name, version, champion.get("version"), comparison.get("why", ""))
    describe_model(client, name)
