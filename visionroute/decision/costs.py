"""Cost model: monthly Vision API bill against training plus self-hosting, per route.

Pure functions over a price file (visionroute/decision/prices.yaml, or the user's own). Figures are planning estimates for
comparing routes, not quotes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

from visionroute.spec import Task
from visionroute.training.catalogue import PLANNED_EPOCHS, catalogue_entry

DEFAULT_PRICES = Path(__file__).with_name("prices.yaml")
PRICES_ENV = "VISIONROUTE_PRICES"


@dataclass(frozen=True)
class Prices:
    raw: dict
    source: str

    @property
    def providers(self) -> list[str]:
        return list(self.raw["vision_api"])

    @property
    def gpu_hour_usd(self) -> float:
        return float(self.raw["compute"]["gpu_hour_usd"])

    @property
    def min_serving_hours(self) -> float:
        return float(self.raw["compute"].get("min_serving_hours_per_month", 0))

    def api_price(self, provider: str, task: Task) -> float | None:
        """USD per 1,000 images, or None when the provider does not offer the feature."""
        value = self.raw["vision_api"][provider]["per_1000"].get(task.value)
        return None if value is None else float(value)

    def free_images(self, provider: str) -> int:
        return int(self.raw["vision_api"][provider].get("free_images_per_month", 0))


@cache
def _read_prices(path: str) -> Prices:
    try:
        raw = yaml.safe_load(Path(path).read_text())
        for provider, block in raw["vision_api"].items():
            for task, value in block["per_1000"].items():
                Task(task)
                if float(value) < 0:
                    raise ValueError(f"vision_api.{provider}.per_1000.{task} is negative")
        float(raw["compute"]["gpu_hour_usd"])
    except FileNotFoundError:
        raise ValueError(
            f"price file {path} does not exist; pass an existing file or drop --prices"
        ) from None
    except (KeyError, TypeError, ValueError, yaml.YAMLError) as error:
        raise ValueError(
            f"price file {path} is malformed ({error!r}); copy {DEFAULT_PRICES} and edit its numbers"
        ) from None
    return Prices(raw=raw, source=path)


def load_prices(path: str | Path | None = None) -> Prices:
    """The given price file, else $VISIONROUTE_PRICES, else the bundled one."""
    return _read_prices(str(path or os.environ.get(PRICES_ENV) or DEFAULT_PRICES))


def api_monthly_cost(prices: Prices, provider: str, task: Task, volume: int) -> float | None:
    per_1000 = prices.api_price(provider, task)
    if per_1000 is None:
        return None
    return max(0, volume - prices.free_images(provider)) * per_1000 / 1000


def cheapest_provider(prices: Prices, task: Task, volume: int) -> tuple[str, float]:
    offers = [
        (cost, provider)
        for provider in prices.providers
        if (cost := api_monthly_cost(prices, provider, task, volume)) is not None
    ]
    cost, provider = min(offers)
    return provider, cost


def hosting_monthly_cost(prices: Prices, model: str, volume: int) -> float:
    """One GPU serving `volume` images a month, never less than the minimum serving hours."""
    hours = volume / catalogue_entry(model).t4_infer_images_per_s / 3600
    return max(hours, prices.min_serving_hours) * prices.gpu_hour_usd


def training_cost(prices: Prices, model: str, route: str, examples: int) -> tuple[float, float]:
    """(GPU hours, USD) to train `model` on `examples` images for the planned epochs of `route`."""
    hours = PLANNED_EPOCHS[route] * examples / catalogue_entry(model).t4_train_images_per_s / 3600
    return hours, hours * prices.gpu_hour_usd


def self_hosted_monthly(
    prices: Prices, model: str, route: str | None, examples: int, volume: int, amortisation_months: int
) -> float:
    """Monthly cost of running our own model; `route=None` means a pretrained model served as-is."""
    train = training_cost(prices, model, route, examples)[1] / amortisation_months if route else 0.0
    return train + hosting_monthly_cost(prices, model, volume)


def break_even_volume(prices: Prices, task: Task, self_hosted_at: Callable[[int], float]) -> int | None:
    """Smallest monthly volume at which the cheapest API's bill exceeds self-hosting, or None past 10 billion.
    The cheapest provider changes with volume (free tiers), so it is chosen at each volume tried."""

    def api_at(volume: int) -> float:
        return cheapest_provider(prices, task, volume)[1]

    low, high = 0, 10_000_000_000
    if api_at(high) <= self_hosted_at(high):
        return None
    while high - low > 1:
        middle = (low + high) // 2
        if api_at(middle) > self_hosted_at(middle):
            high = middle
        else:
            low = middle
    return high


def route_costs(
    prices: Prices,
    task: Task,
    examples: int,
    volume: int,
    *,
    finetune_model: str,
    scratch_model: str,
    amortisation_months: int,
    api_task: Task | None = None,
) -> dict:
    """Per-route cost estimates, as recorded in the decision. `api_task` is what a Vision API would be asked
    (a classify task with a label_map is served by tagging); None when no API can serve the task."""
    costs: dict = {
        "prices": {"file": prices.source, "as_of": prices.raw.get("as_of")},
        "monthly_volume": volume,
    }
    for route, model in (("finetune", finetune_model), ("scratch", scratch_model)):
        gpu_hours, train_usd = training_cost(prices, model, route, examples)
        hosting = hosting_monthly_cost(prices, model, volume)
        costs[route] = {
            "model": model,
            "training_gpu_hours": round(gpu_hours, 3),
            "training_usd": round(train_usd, 2),
            "hosting_monthly_usd": round(hosting, 2),
            "monthly_usd": round(train_usd / amortisation_months + hosting, 2),
        }
    if api_task is None:
        costs["vision_api"] = {
            "applicable": False,
            "why": "no Vision API knows the team's own classes (a vision_api.label_map would let tags serve them)",
        }
        return costs
    task = api_task
    provider, monthly = cheapest_provider(prices, task, volume)
    by_provider = {
        name: None if (cost := api_monthly_cost(prices, name, task, volume)) is None else round(cost, 2)
        for name in prices.providers
    }
    self_route = "finetune" if examples else None

    def self_hosted(v: int) -> float:
        return self_hosted_monthly(prices, finetune_model, self_route, examples, v, amortisation_months)

    costs["vision_api"] = {
        "applicable": True,
        "provider": provider,
        "feature": task.value,
        "per_1000_usd": prices.api_price(provider, task),
        "monthly_usd": round(monthly, 2),
        "by_provider": by_provider,
    }
    costs["self_hosted_monthly_usd"] = round(self_hosted(volume), 2)
    costs["break_even_monthly_volume"] = break_even_volume(prices, task, self_hosted)
    return costs
