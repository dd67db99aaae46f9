"""From a task spec to annotated images: build the provider, its limiter and the cache, run the runner, and
turn its figures into tracked numbers. Shared by the vision_api backend and `visionroute fit-test`."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from visionroute import tracking
from visionroute.data.dataset import DatasetError, scan_images
from visionroute.decision.costs import Prices
from visionroute.decision.rules import api_task
from visionroute.spec import Task, TaskSpec
from visionroute.vision import local
from visionroute.vision.base import Provider, ProviderSettings, Quota, create_provider
from visionroute.vision.cache import ResultCache
from visionroute.vision.ratelimit import limiter_for
from visionroute.vision.retry import RetryPolicy
from visionroute.vision.runner import RunStats, annotate_images


def settings_for(spec: TaskSpec) -> ProviderSettings:
    v = spec.vision_api
    return ProviderSettings(
        endpoint=v.endpoint,
        transport=v.transport,
        region=v.region,
        timeout_s=v.timeout_s,
        ocr_mode=v.ocr_mode,
        s3_bucket=v.s3_bucket,
    )


def quota_for(spec: TaskSpec, provider: Provider) -> Quota:
    """The provider's default quota with the spec's overrides (per minute in the spec, per second here)."""
    v, default = spec.vision_api, provider.default_quota
    return Quota(
        requests_per_s=v.requests_per_minute / 60 if v.requests_per_minute else default.requests_per_s,
        units_per_s=v.images_per_minute / 60 if v.images_per_minute else default.units_per_s,
    )


def feature_for(spec: TaskSpec) -> str:
    """What the API is asked: the generic task itself, or tags for a classify task with a label_map (the
    decision rules' `api_task`, so that what is priced is what is sent)."""
    task = api_task(spec)
    if task is None:
        raise ValueError(f"no Vision API serves task {spec.task.value} without a vision_api.label_map")
    return task.value


def input_paths(spec: TaskSpec, dataset=None) -> tuple[list[str], list[dict]]:
    """(image paths to send, files left out with the reason): vision_api.input, else the images of data.path."""
    if spec.vision_api.input is not None:
        found = scan_images(spec.vision_api.input)
    elif dataset is not None:
        found = dataset
    elif spec.data and spec.data.path:
        found = scan_images(spec.data.path)
    else:
        raise DatasetError(
            "the vision_api route needs images: set vision_api.input (or data.path) to a folder or an image file"
        )
    require_files(found)
    return [s.ref for s in found.samples], [{"path": s.path, "reason": s.reason} for s in found.skipped]


def require_files(dataset) -> None:
    """Vision APIs take image files: refuse array rows (a MedMNIST .npz) with what to do instead."""
    if any(s.ref.startswith("npz:") for s in dataset.samples[:1]):
        raise DatasetError(
            f"{dataset.root}: the vision_api route sends image files; a .npz holds arrays. Export the images as "
            "PNG files and point vision_api.input (or data.path) at their folder"
        )


@dataclass
class Annotated:
    provider: str
    feature: str
    stats: RunStats
    rows: list[dict]
    estimated_cost_usd: float

    def metrics(self) -> dict:
        return {**self.stats.metrics(), "estimated_cost_usd": self.estimated_cost_usd}


def estimated_cost(prices: Prices, provider: str, feature: str, billed_units: int) -> float:
    """List price of the billed units (free tiers not subtracted: a job does not know the month's other use)."""
    if provider == local.LocalProvider.name:
        return 0.0
    per_1000 = prices.api_price(provider, Task(feature)) or 0.0
    return round(billed_units * per_1000 / 1000, 4)


def annotate(
    spec: TaskSpec,
    provider_name: str,
    paths: list[str],
    prices: Prices,
    *,
    on_progress: Callable[[int, int], None] | None = None,
    sink: Callable[[dict], None] | None = None,
    progress_bar: bool = True,
) -> Annotated:
    """Send `paths` to the provider under the spec's settings, with the shared cache and quota."""
    provider = create_provider(provider_name, settings_for(spec))
    feature = feature_for(spec)
    quota = quota_for(spec, provider)
    # One limiter per provider endpoint and quota: flows in this process calling the same API share it.
    limiter = limiter_for(
        f"{provider.name}-{spec.vision_api.endpoint or 'default'}", quota, provider.max_batch
    )
    cache = ResultCache(tracking.state_dir() / "vision_cache.db") if spec.vision_api.cache else None
    # Google's dense-document OCR is a different answer from plain OCR of the same bytes, and another endpoint
    # (a private gateway, a test fake, another region's model) may answer differently: both are in the key.
    cache_feature = f"{feature}:{spec.vision_api.ocr_mode}" if feature == "ocr" else feature
    cache_feature += f"@{spec.vision_api.endpoint or 'default'}"
    rows: list[dict] = []
    bar = tqdm(total=len(paths), desc=f"{provider.name} {feature}", unit="img", disable=not progress_bar)

    def emit(row: dict) -> None:
        rows.append(row)
        bar.update(1)
        if sink:
            sink(row)

    try:
        stats = annotate_images(
            paths,
            provider,
            feature,
            limiter=limiter,
            cache=cache,
            cache_feature=cache_feature,
            policy=RetryPolicy(deadline_s=spec.vision_api.retry_deadline_s),
            emit=emit,
            on_progress=on_progress,
            concurrency=spec.vision_api.concurrency,
            seed=spec.training.seed,
        )
    finally:
        bar.close()
    cost = estimated_cost(prices, provider.name, feature, stats.billed_units)
    return Annotated(provider.name, feature, stats, rows, cost)


def map_to_class(labels: list[dict], label_map: dict[str, list[str]]) -> tuple[str | None, float]:
    """The class whose provider labels scored highest among `labels` (case-insensitive), or None."""
    wanted = {name.lower(): cls for cls, names in label_map.items() for name in names}
    best, best_score = None, -1.0
    for label in labels:
        cls = wanted.get(label["name"].lower())
        if cls is not None and label["score"] > best_score:
            best, best_score = cls, label["score"]
    return best, max(best_score, 0.0)


def classify_rows(rows: list[dict], label_map: dict[str, list[str]], truth: dict[str, str]) -> None:
    """Set each row's `class` through the label map (None for an error or no mapped label), and its
    `true_class` where `truth` (path -> class) knows it."""
    for row in rows:
        row["class"] = None if row["error"] else map_to_class(row["labels"], label_map)[0]
        if row["path"] in truth:
            row["true_class"] = truth[row["path"]]


def jsonl_text(rows: list[dict]) -> str:
    """The rows as JSON lines, sorted by path (completion order is not reproducible)."""
    return "".join(json.dumps(row) + "\n" for row in sorted(rows, key=lambda r: r["path"]))


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(jsonl_text(rows))
    return path
