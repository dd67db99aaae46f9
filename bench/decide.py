"""Decision throughput: `decide` over N generated specs in one process (spec validation included).

    python bench/decide.py [--count 1000]

Target: 1,000 decisions in under 2 s. The raw baseline is the same number of bare pydantic validations,
so the ratio shows what the rules and the cost model add on top of parsing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

from visionroute.decision.costs import load_prices
from visionroute.decision.rules import CannotDecide, DataSummary, decide
from visionroute.spec import parse_spec

TASKS = ["classify", "tag", "ocr", "detect_objects", "detect_faces"]
DOMAINS = ["natural", "product", "medical", "industrial", "radar", "microscopy", "volumetric", "other"]


def raw_specs(count: int) -> list[dict]:
    combos = itertools.cycle(itertools.product(TASKS, DOMAINS, [0, 800, 15_000, 200_000], [True, False]))
    specs = []
    for index, (task, domain, examples, allowed) in zip(range(count), combos, strict=False):
        specs.append(
            {
                "name": f"task-{index}",
                "task": task,
                "domain": domain,
                "data": {"labeled_examples": examples},
                "constraints": {
                    "external_api_allowed": allowed,
                    "monthly_volume": 1000 * (index % 900),
                    "proven_need": index % 7 == 0,
                },
            }
        )
    return specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    args = parser.parse_args()
    specs = raw_specs(args.count)
    prices = load_prices()

    started = time.perf_counter()
    parsed = [parse_spec(raw) for raw in specs]
    parse_seconds = time.perf_counter() - started

    started = time.perf_counter()
    routes: dict[str, int] = {}
    for raw in specs:
        spec = parse_spec(raw)
        try:
            decision = decide(spec, DataSummary(spec.data.labeled_examples), prices)
            routes[decision.route] = routes.get(decision.route, 0) + 1
        except CannotDecide:
            routes["cannot_decide"] = routes.get("cannot_decide", 0) + 1
    total = time.perf_counter() - started
    print(
        json.dumps(
            {
                "specs": len(parsed),
                "seconds": round(total, 3),
                "decisions_per_s": round(len(specs) / total),
                "parse_only_seconds": round(parse_seconds, 3),
                "ratio_to_parse_only": round(total / parse_seconds, 1),
                "routes": routes,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
