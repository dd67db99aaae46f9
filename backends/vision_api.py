"""Route `vision_api`: generic tasks (tags, OCR, objects, faces), or a classify task through a label_map, sent
to a cloud Vision API (google, aws, azure) or run on premises (local).

Recipe: pick the images (vision_api.input, else data.path) -> annotate them at the quota's speed with
retries and the result cache (visionroute.vision.runner) -> one JSON line per image -> log to MLflow: images
sent, billed units, cache hits, errors by kind, estimated cost, latency p50/p95, images/s, the results.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from visionroute.backends.base import BackendContext, BackendResult, BackendUnavailable, register_backend

from visionroute import tracking
from visionroute.decision.costs import load_prices
from visionroute.vision.base import ApiError, ProviderConfigError


@dataclass
class VisionApiBackend:
    name: str = "vision_api"

    def run(self, context: BackendContext) -> BackendResult:
        from visionroute.vision.service import annotate, classify_rows, input_paths, write_jsonl

        spec, provider = context.spec, context.decision.provider
        paths, skipped = input_paths(spec, context.dataset)
        truth = {}
        if spec.classify_by_api and context.dataset is not None and spec.vision_api.input is None:
            truth = {s.ref: context.dataset.classes[s.label] for s in context.dataset.samples}

        client = tracking.configure()
        with tracking.run(
            client,
            spec.name,
            f"vision-api-{provider}",
            {"visionroute.route": self.name, "visionroute.provider": provider},
            context.parent_run_id,
        ) as run_id:
            v = spec.vision_api
            # Settings only: credentials never reach params (each SDK reads its own from the environment).
            tracking.log_params(
                client,
                run_id,
                {
                    "provider": provider,
                    "feature": "tag" if spec.classify_by_api else spec.task.value,
                    "images": len(paths),
                    "endpoint": v.endpoint or "default",
                    "transport": v.transport if provider == "google" else None,
                    "requests_per_minute": v.requests_per_minute or "provider default",
                    "images_per_minute": v.images_per_minute or "provider default",
                    "retry_deadline_s": v.retry_deadline_s,
                    "cache": v.cache,
                },
            )
            tracking.log_json(client, run_id, skipped, "data/skipped.json")
            total = max(1, len(paths))
            step = max(1, total // 50)  # about 50 progress updates, not one per image

            def on_progress(done: int, _total: int) -> None:
                if context.on_progress and (done % step == 0 or done == total):
                    context.on_progress({"done": done, "total": total})

            # Rows are appended as they arrive, so an interrupted job keeps what it was answered (and the cache
            # serves those answers to the re-run without billing them again).
            context.work_dir.mkdir(parents=True, exist_ok=True)
            partial = context.work_dir / "results.partial.jsonl"
            with partial.open("w") as stream:

                def sink(row: dict) -> None:
                    stream.write(json.dumps(row) + "\n")
                    stream.flush()

                try:
                    result = annotate(
                        spec,
                        provider,
                        paths,
                        load_prices(context.prices_path),
                        on_progress=on_progress,
                        sink=sink,
                    )
                except (ProviderConfigError, ApiError) as error:
                    raise BackendUnavailable(str(error)) from None
            metrics = result.metrics()
            if spec.classify_by_api:
                classify_rows(result.rows, v.label_map, truth)
                labelled = [row for row in result.rows if "true_class" in row]
                if labelled:
                    correct = sum(row["class"] == row["true_class"] for row in labelled)
                    metrics["accuracy"] = round(correct / len(labelled), 4)
            tracking.log_metrics(client, run_id, metrics)
            with_errors = [row for row in result.rows if row["error"]]
            tracking.log_json(client, run_id, with_errors, "errors.json")
            out = write_jsonl(result.rows, context.work_dir / "results.jsonl")
            partial.unlink()
            client.log_artifact(run_id, str(out))
            if v.output is not None:
                write_jsonl(result.rows, v.output)
            if metrics["answered"] == 0 and metrics["errors"]:
                kinds = ", ".join(f"{kind} x{n}" for kind, n in sorted(result.stats.errors_by_kind.items()))
                raise BackendUnavailable(
                    f"{provider}: no image was answered ({kinds}); the first error: {with_errors[0]['error']['message']}. "
                    f"Every image's error is in {out}"
                )
        summary = (
            f"{provider} {result.feature}: {metrics['answered']} of {metrics['images']} image(s) answered "
            f"({metrics['cache_hits']} from cache, {metrics['errors']} error(s)), "
            + (
                "on premises, nothing billed"
                if provider == "local"
                else f"{metrics['billed_units']} billed unit(s), about ${metrics['estimated_cost_usd']:.2f}"
            )
            + f", {metrics['images_per_s']} images/s; results: {v.output or out}"
        )
        return BackendResult(route=self.name, run_id=run_id, metrics=metrics, summary=summary)


@register_backend("vision_api")
def create_vision_api_backend(**config) -> VisionApiBackend:
    return VisionApiBackend(**config)
