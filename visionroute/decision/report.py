"""How a decision reads for a person: markdown for the Prefect UI and MLflow, and the cost table rows."""

from __future__ import annotations

from visionroute.decision.rules import Decision


def decision_markdown(name: str, decision: Decision) -> str:
    lines = [
        f"# {name}: route `{decision.route}`"
        + (f" (provider `{decision.provider}`)" if decision.provider else "")
    ]
    lines.append(
        f"**Rule** `{decision.rule}`"
        + (f" (framework's own choice: `{decision.auto_rule}`)" if decision.forced else "")
    )
    if decision.model:
        lines.append(f"**Model** `{decision.model}`")
    lines += ["", "## Why"] + [f"- {reason}" for reason in decision.reasons]
    if decision.warnings:
        lines += ["", "## Warnings"] + [f"- {warning}" for warning in decision.warnings]
    if decision.evaluation:
        evaluation = decision.evaluation
        lines += [
            "",
            "## Evaluation",
            f"- test split: {evaluation['test_split']}; {evaluation['test_images']} images {evaluation['test_per_class']}",
            f"- leakage: {evaluation['leakage_handling']}",
            "- test accuracy is reported with its 95% Wilson interval; champion moves only on a gain beyond it",
        ]
        if evaluation["cannot_promote"]:
            lines.append(f"- no champion from this run: {evaluation['cannot_promote']}")
    lines += ["", "## Routes not taken"] + [
        f"- `{item['route']}`: {item['why']}" for item in decision.rejected
    ]
    lines += [
        "",
        "## Cost per route (USD)",
        "",
        "| route | monthly | training | hosting / month | note |",
        "|---|---|---|---|---|",
    ]
    for row in cost_rows(decision):
        lines.append(
            f"| {row['route']} | {row['monthly_usd']} | {row['training_usd']} | {row['hosting_monthly_usd']}"
            f" | {row['note']} |"
        )
    costs = decision.costs
    if costs.get("break_even_monthly_volume"):
        lines.append(
            f"\nBreak-even volume (API bill = self-hosting): {costs['break_even_monthly_volume']:,} "
            "images/month."
        )
    lines.append(f"\nPrices: {costs['prices']['file']} (as of {costs['prices']['as_of']}).")
    return "\n".join(lines) + "\n"


def cost_rows(decision: Decision) -> list[dict]:
    """One row per route: what it would cost at the spec's monthly volume."""
    costs = decision.costs
    rows = []
    api = costs["vision_api"]
    if api["applicable"]:
        rows.append(
            {
                "route": "vision_api",
                "monthly_usd": api["monthly_usd"],
                "training_usd": 0.0,
                "hosting_monthly_usd": 0.0,
                "note": f"{api['provider']} at ${api['per_1000_usd']}/1,000",
            }
        )
    else:
        rows.append(
            {
                "route": "vision_api",
                "monthly_usd": "n/a",
                "training_usd": "n/a",
                "hosting_monthly_usd": "n/a",
                "note": api["why"],
            }
        )
    for route in ("finetune", "scratch"):
        block = costs[route]
        rows.append(
            {
                "route": route,
                "monthly_usd": block["monthly_usd"],
                "training_usd": block["training_usd"],
                "hosting_monthly_usd": block["hosting_monthly_usd"],
                "note": f"{block['model']}, {block['training_gpu_hours']} GPU h",
            }
        )
    return rows
