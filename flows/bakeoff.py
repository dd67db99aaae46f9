"""The `bakeoff` Prefect flow: train several routes on the same split and budget, register each, let the
registry keep the better as champion, and show the framework's choice beside the measured winner.

Thin on purpose: planning, the training backends, registration and the report are plain functions.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from visionroute.backends import BackendContext, create_backend
from visionroute.flows.route import plan_task

from visionroute import tracking
from visionroute.bakeoff_report import bakeoff_rows, plot_bakeoff, verdict

TRAINING_ROUTES = ("finetune", "scratch")


@flow(name="bakeoff")
def bakeoff(spec_path: str, routes: str = "finetune,scratch", prices_path: str | None = None) -> dict:
    """Each route in `routes` trained as a sibling MLflow run under one parent, registered and compared."""
    names = [route.strip() for route in routes.split(",") if route.strip()]
    unknown = [route for route in names if route not in TRAINING_ROUTES]
    if unknown or len(names) < 2:
        raise ValueError(
            f"a bake-off trains two or more of {', '.join(TRAINING_ROUTES)}; got {routes!r}"
            + (f" ({', '.join(unknown)} cannot be trained)" if unknown else "")
        )
    planned = plan_task(spec_path, prices_path)
    spec, decision = planned.spec, planned.decision
    if planned.dataset is None:
        raise ValueError("a bake-off needs labelled images: set data.path in the spec")
    client = tracking.configure()
    with tracking.run(
        client,
        spec.name,
        "bakeoff-" + "-vs-".join(names),
        {
            "visionroute.bakeoff": ",".join(names),
            "visionroute.route": decision.route,
            "visionroute.rule": decision.rule,
        },
    ) as parent:
        tracking.log_json(client, parent, decision.to_dict(), "decision.json")
        outcomes = []
        for route in names:
            # Each route trains the model the decision priced for it, on the split the plan fixed.
            routed = replace(decision, route=route, model=decision.costs[route]["model"])
            context = BackendContext(
                spec,
                routed,
                planned.dataset,
                parent,
                tracking.state_dir() / "runs" / parent,
                None,
                prices_path,
            )
            outcome = create_backend(route).run(context).__dict__
            outcome["model"] = routed.model
            outcomes.append(outcome)
        rows = bakeoff_rows(outcomes, decision.route)
        summary = verdict(rows, decision.route)
        tracking.log_json(client, parent, {"rows": rows, "verdict": summary}, "bakeoff.json")
        with tempfile.TemporaryDirectory() as folder:
            chart = plot_bakeoff(rows, decision.route, Path(folder) / "bakeoff.png", spec.name)
            client.log_artifact(parent, str(chart))
        create_table_artifact(key=f"{spec.name}-bakeoff", table=rows, description=summary)
        create_markdown_artifact(
            key=f"{spec.name}-bakeoff-verdict", markdown=f"# {spec.name}: bake-off\n\n{summary}"
        )
    print(summary)
    return {"parent_run_id": parent, "rows": rows, "verdict": summary, "framework_choice": decision.route}
