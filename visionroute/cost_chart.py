"""The cost comparison as a picture: what each route costs per month, and where the API overtakes self-hosting."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from visionroute.decision.costs import Prices, cheapest_provider, self_hosted_monthly
from visionroute.decision.policy import DEFAULT_POLICY
from visionroute.decision.rules import Decision
from visionroute.spec import Task


def plot_costs(decision: Decision, prices: Prices, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    costs = decision.costs
    api = costs["vision_api"]
    routes = [("finetune", costs["finetune"]["monthly_usd"]), ("scratch", costs["scratch"]["monthly_usd"])]
    if api["applicable"]:
        routes.insert(0, (f"vision_api\n({api['provider']})", api["monthly_usd"]))
    chosen = decision.route
    figure, (bars, curve) = plt.subplots(1, 2, figsize=(11, 4.2), width_ratios=(1, 1.4))
    colours = ["tab:green" if name.startswith(chosen) else "tab:grey" for name, _ in routes]
    bars.bar([name for name, _ in routes], [value for _, value in routes], color=colours)
    bars.set_ylabel("USD per month (training amortised)")
    bars.set_title(f"at {costs['monthly_volume']:,} images/month (chosen in green)")
    for index, (_, value) in enumerate(routes):
        bars.annotate(f"${value:,.0f}", (index, value), ha="center", va="bottom")

    if api["applicable"]:
        task = Task(api["feature"])  # classify through a label_map is priced as tagging
        examples = decision.inputs["labeled_examples"]
        model = costs["finetune"]["model"]
        top = max(10 * (costs.get("break_even_monthly_volume") or costs["monthly_volume"] or 1000), 10_000)
        volumes = np.linspace(0, top, 200).astype(int)
        route = "finetune" if examples else None
        self_hosted = [
            self_hosted_monthly(prices, model, route, examples, int(v), DEFAULT_POLICY.amortisation_months)
            for v in volumes
        ]
        curve.plot(
            volumes, [cheapest_provider(prices, task, int(v))[1] for v in volumes], label="cheapest API"
        )
        curve.plot(
            volumes, self_hosted, label="self-hosted" + (" (fine-tuned)" if examples else " (pretrained)")
        )
        if costs.get("break_even_monthly_volume"):
            curve.axvline(
                costs["break_even_monthly_volume"], color="black", linestyle=":", label="break-even"
            )
        curve.axvline(costs["monthly_volume"], color="tab:green", linestyle="--", label="this task")
        curve.set_xlabel("images per month")
        curve.set_ylabel("USD per month")
        curve.legend()
        curve.set_title("API bill against self-hosting")
    else:
        curve.axis("off")
        curve.text(0.5, 0.5, api["why"], ha="center", va="center", wrap=True)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
