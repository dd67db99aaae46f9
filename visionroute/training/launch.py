"""What each process runs under `visionroute train SPEC --nproc-per-node N` (torchrun's entry point).

Rank 0 runs the ordinary route flow (plan, MLflow parent run, the training backend, registration); the other
ranks plan the same task (the same validation and seeded split) and train alongside it without tracking.
Usage (through torchrun): python -m visionroute.training.launch SPEC [--prices FILE]
"""

from __future__ import annotations

import argparse
import sys

from visionroute.training import distributed


def follow(spec_path: str, prices_path: str | None) -> None:
    """A rank other than 0: the same plan, the same backend, no tracking."""
    from pathlib import Path

    from visionroute.backends import create_backend
    from visionroute.backends.base import BackendContext, BackendUnavailable
    from visionroute.planning import plan

    planned = plan(spec_path, prices_path, check_images=True)
    route = planned.decision.route
    if route not in ("finetune", "scratch"):
        raise BackendUnavailable(f"visionroute train runs training routes; this task's route is {route}")
    context = BackendContext(
        planned.spec, planned.decision, planned.dataset, None, Path("."), None, prices_path
    )
    create_backend(route).run(context)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="visionroute.training.launch")
    parser.add_argument("spec")
    parser.add_argument("--prices")
    args = parser.parse_args(argv)
    distributed.setup()
    try:
        if distributed.is_main():
            from visionroute.cli import main as cli

            return cli(["run", args.spec] + (["--prices", args.prices] if args.prices else []))
        follow(args.spec, args.prices)
        return 0
    finally:
        distributed.teardown()


if __name__ == "__main__":
    sys.exit(main())
