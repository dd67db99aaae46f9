"""API fit test: can a generic Vision API serve a classify task through a label_map? Send a stratified labelled
sample, map each answer's labels to a class, and measure accuracy per class and the cost, tracked in MLflow.
The route flow runs it before a label-map API route and escalates to training when it misses the target."""

from __future__ import annotations

from collections import Counter

from visionroute import tracking
from visionroute.data.dataset import ImageDataset, stratified_sample
from visionroute.decision.costs import Prices, api_monthly_cost
from visionroute.spec import Task, TaskSpec
from visionroute.vision.base import ApiError
from visionroute.vision.service import annotate, classify_rows, jsonl_text, require_files

UNMAPPED = "(unmapped)"


def fit_test(
    spec: TaskSpec,
    dataset: ImageDataset,
    provider: str,
    prices: Prices,
    *,
    sample: int | None = None,
    parent_run_id: str | None = None,
    progress_bar: bool = True,
) -> dict:
    """Accuracy of `provider` on a labelled sample through spec.vision_api.label_map; logged as an MLflow run
    (nested under `parent_run_id` when given). Errors count as misses: the API did not classify the image."""
    label_map = spec.vision_api.label_map
    if not label_map:
        raise ValueError(
            "the fit test needs vision_api.label_map: map each class to the provider labels meaning it"
        )
    missing = sorted(set(dataset.classes) - set(label_map))
    if missing:
        raise ValueError(f"vision_api.label_map has no entry for class(es) {missing}; map every class")
    require_files(dataset)
    chosen = stratified_sample(dataset, sample or spec.vision_api.fit_sample, spec.training.seed)
    truth = {s.ref: dataset.classes[s.label] for s in chosen}
    client = tracking.configure()
    with tracking.run(
        client,
        spec.name,
        f"fit-test-{provider}",
        {"visionroute.kind": "fit-test", "visionroute.provider": provider},
        parent_run_id,
    ) as run_id:
        result = annotate(spec, provider, list(truth), prices, progress_bar=progress_bar)
        report = _report(spec, dataset, prices, result, truth, label_map)
        report["run_id"] = run_id
        _log(client, run_id, spec, report, result)
        failed = [row for row in result.rows if row["error"]]
        if len(failed) * 2 > report["images"]:
            # Mostly errors measure the credential or the network, not the API's accuracy: never escalate on
            # them.
            kinds = Counter(row["error"]["kind"] for row in failed)
            raise ApiError(
                failed[0]["error"]["kind"],
                f"the fit test could not measure {result.provider}: {len(failed)} of {report['images']} images "
                f"failed ({', '.join(f'{k} x{n}' for k, n in sorted(kinds.items()))}; first: "
                f"{failed[0]['error']['message']}). Fix that and run it again; nothing was escalated",
            )
    return report


def _report(spec: TaskSpec, dataset: ImageDataset, prices: Prices, result, truth: dict, label_map) -> dict:
    classify_rows(result.rows, label_map, truth)
    per_class: dict[str, Counter] = {name: Counter() for name in dataset.classes}
    confusion: Counter = Counter()
    for row in result.rows:
        actual, predicted = row["true_class"], row["class"]
        per_class[actual]["images"] += 1
        per_class[actual]["correct"] += predicted == actual
        per_class[actual]["errors"] += row["error"] is not None
        confusion[(actual, predicted or UNMAPPED)] += 1
    images = len(result.rows)
    correct = sum(counts["correct"] for counts in per_class.values())
    return {
        "provider": result.provider,
        "feature": result.feature,
        "images": images,
        "accuracy": round(correct / images, 4) if images else 0.0,
        "per_class": {
            name: {
                "images": counts["images"],
                "accuracy": round(counts["correct"] / counts["images"], 4) if counts["images"] else None,
                "errors": counts["errors"],
            }
            for name, counts in per_class.items()
        },
        "unmapped": sum(n for (_, predicted), n in confusion.items() if predicted == UNMAPPED),
        "confusion": [{"actual": a, "predicted": p, "images": n} for (a, p), n in sorted(confusion.items())],
        "target_accuracy": spec.vision_api.target_accuracy,
        "estimated_cost_usd": result.estimated_cost_usd,
        "monthly_cost_usd": _monthly(spec, prices, result.provider),
        **{
            key: value
            for key, value in result.metrics().items()
            if key in ("cache_hits", "billed_units", "errors")
        },
    }


def _monthly(spec: TaskSpec, prices: Prices, provider: str) -> float | None:
    if provider == "local":
        return 0.0
    cost = api_monthly_cost(prices, provider, Task.tag, spec.constraints.monthly_volume)
    return None if cost is None else round(cost, 2)


def _log(client, run_id: str, spec: TaskSpec, report: dict, result) -> None:
    tracking.log_params(
        client,
        run_id,
        {
            "provider": report["provider"],
            "feature": report["feature"],
            "sample": report["images"],
            "label_map": spec.vision_api.label_map,
            "target_accuracy": report["target_accuracy"],
        },
    )
    tracking.log_metrics(
        client,
        run_id,
        {
            "fit_accuracy": report["accuracy"],
            "unmapped": report["unmapped"],
            "estimated_cost_usd": report["estimated_cost_usd"],
            **{
                f"fit_accuracy_{name}": v["accuracy"]
                for name, v in report["per_class"].items()
                if v["accuracy"] is not None
            },
            **{key: value for key, value in result.metrics().items() if not key.startswith("accuracy")},
        },
    )
    tracking.log_json(client, run_id, report, "fit_test.json")
    tracking.log_text(client, run_id, jsonl_text(result.rows), "fit_test_results.jsonl")
