"""`visionroute` command line: each subcommand is a thin call into the functions the flows use.

Exit codes: 0 done; 2 bad input (spec, data, price file, or no route can serve the task); 1 a route failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from visionroute.vision.base import BUILTIN_PROVIDERS

BAD_INPUT, FAILED = 2, 1


def _schema(args) -> int:
    from visionroute.spec import spec_json_schema

    print(json.dumps(spec_json_schema(), indent=2))
    return 0


def _decide(args) -> int:
    from visionroute.decision.report import decision_markdown
    from visionroute.planning import plan

    status = 0
    for spec_path in args.spec:
        result = plan(spec_path, args.prices, measure_domain=args.measure_domain)
        if args.json:
            print(
                json.dumps(
                    {"spec": spec_path, "name": result.spec.name, **result.decision.to_dict()}, indent=2
                )
            )
        else:
            print(decision_markdown(result.spec.name, result.decision))
    return status


def _before_a_flow() -> None:
    """What every flow started from the command line needs first: the store checked (seconds, before any data
    is read or any server started), the Prefect API (a temporary server with a generous start-up limit, tied to
    this process), and expected errors kept to their one `error:` line."""
    from visionroute import tracking
    from visionroute.prefect_api import ensure_api

    tracking.check_store()
    ensure_api()
    import visionroute.flows.route  # noqa: F401  (its imports set up logging: quiet the handlers it leaves)

    _quiet_expected_tracebacks()


def _run(args) -> int:
    _before_a_flow()
    from visionroute.flows.route import route_image_task

    outcome = route_image_task(args.spec, args.prices or "")
    _print_outcome(outcome)
    return 0


def _print_outcome(outcome: dict) -> None:
    result = outcome["result"]
    print(f"\nparent MLflow run: {outcome['parent_run_id']}  (tracking store: {outcome['tracking_uri']})")
    if result.get("model_version"):
        alias = "champion" if result["promoted"] else "challenger"
        print(
            f"registered model: models:/{result['model_name']}/{result['model_version']} "
            f"(models:/{result['model_name']}@{alias})"
        )


def _train(args) -> int:
    """The route flow with N training processes per node (torchrun DDP: NCCL on GPUs, gloo on CPUs). torchrun's
    multi-node settings reach it as its own PET_* environment variables."""
    import subprocess

    from visionroute.backends.base import BackendUnavailable
    from visionroute.planning import plan
    from visionroute.training.launch import torchrun_command

    if args.nnodes != 1:
        if not (args.rdzv_endpoint and args.nproc_per_node):
            raise BackendUnavailable(
                "several nodes need --rdzv-endpoint HOST:PORT (node 0's address) and --nproc-per-node N, the "
                "same on every node"
            )
        # Static rendezvous: global ranks follow --node-rank, so node 0 (where the flow runs) holds rank 0.
        settings = {"NNODES": args.nnodes, "NODE_RANK": args.node_rank, "RDZV_BACKEND": "static"}
        settings["RDZV_ENDPOINT"] = args.rdzv_endpoint
        os.environ.update({f"PET_{key}": str(value) for key, value in settings.items()})
    route = plan(args.spec, args.prices).decision.route  # a bad spec or a non-training task fails here, once
    if route not in ("finetune", "scratch"):
        raise BackendUnavailable(
            f"visionroute train runs training routes; this task's route is {route} (use visionroute run)"
        )
    if args.node_rank > 0:  # rank 0 and the flow live on node 0; this node's ranks follow them
        command = torchrun_command(args.nproc_per_node, args.spec)
        return subprocess.call(command + (["--prices", args.prices] if args.prices else []))
    _before_a_flow()
    from visionroute.flows.route import route_image_task
    from visionroute.forms import RunOverrides

    outcome = route_image_task(
        args.spec, args.prices or "", overrides=RunOverrides(processes=args.nproc_per_node)
    )
    _print_outcome(outcome)
    return 0


def _bakeoff(args) -> int:
    _before_a_flow()
    from visionroute.flows.bakeoff import bakeoff

    outcome = bakeoff(args.spec, args.routes, args.prices)
    for row in outcome["rows"]:
        print(
            f"{row['route']:<9} {row['model']:<24} test accuracy {row['test_accuracy']:.4f}  "
            f"v{row['version']}" + ("  champion" if row["promoted"] else "")
        )
    print(outcome["verdict"])
    return 0


def _predict(args) -> int:
    from visionroute.predict import predict_paths

    rows = predict_paths(args.model, [Path(p) for p in args.paths], args.out, top_k=args.top_k)
    if not args.out:
        for row in rows:
            print(json.dumps(row))
    bad = sum(1 for row in rows if row.get("error"))
    print(
        f"{len(rows) - bad} image(s) labelled, {bad} skipped"
        + (f"; written to {args.out}" if args.out else ""),
        file=sys.stderr,
    )
    return 0 if len(rows) > bad else BAD_INPUT


def _fit_test(args) -> int:
    from visionroute import tracking
    from visionroute.decision.costs import load_prices
    from visionroute.planning import read_data
    from visionroute.spec import load_spec
    from visionroute.vision.fit_test import fit_test

    spec = load_spec(args.spec)
    tracking.check_store()  # before any image is sent (and billed)
    dataset, _ = read_data(spec)
    if dataset is None:
        print("error: the fit test needs labelled images: set data.path in the spec", file=sys.stderr)
        return BAD_INPUT
    provider = args.provider or spec.vision_api.provider
    if provider == "auto":
        print(f"error: name the provider to test: --provider {'|'.join(BUILTIN_PROVIDERS)}", file=sys.stderr)
        return BAD_INPUT
    report = fit_test(spec, dataset, provider, load_prices(args.prices), sample=args.sample)
    print(json.dumps({key: value for key, value in report.items() if key != "confusion"}, indent=2))
    target = spec.vision_api.target_accuracy
    if target is not None:
        verdict = "meets" if report["accuracy"] >= target else "misses"
        print(f"{provider}: accuracy {report['accuracy']:.3f} {verdict} target {target}", file=sys.stderr)
    return 0


def _promote(args) -> int:
    from visionroute import review, tracking

    client = tracking.configure()
    if args.command == "promote":
        entry = review.promote(client, args.name, args.version, args.reviewer, args.reason)
    else:
        entry = review.rollback(client, args.name, args.reviewer, args.reason)
    previous = f"v{entry['previous']}" if entry["previous"] else "none"
    print(
        f"{args.name}: champion {previous} -> v{entry['version']} ({entry['action']} by {entry['reviewer']})"
    )
    return 0


def _history(args) -> int:
    from datetime import datetime

    from visionroute import review, tracking

    client = tracking.configure()
    if args.at:
        entry = review.champion_on(client, args.name, datetime.fromisoformat(args.at))
        if entry is None:
            print(f"{args.name} had no champion on {args.at}")
            return 0
        print(json.dumps(entry, indent=2))
        return 0
    print(review.history_markdown(client, args.name))
    return 0


def _up(args) -> int:
    from visionroute import services, tracking

    state = tracking.state_dir()
    running = services.running_settings(state)
    settings = services.Settings(
        state=state,
        host=args.host or (running.host if running else services.DEFAULT_HOST),
        prefect_port=args.prefect_port
        or (running.prefect_port if running else services.DEFAULT_PREFECT_PORT),
        mlflow_port=args.mlflow_port or (running.mlflow_port if running else services.DEFAULT_MLFLOW_PORT),
        gpus=services.gpu_count() if args.gpus is None else args.gpus,
    )
    report = services.up(settings, echo=lambda line: print(line, file=sys.stderr), timeout=args.timeout)
    if report.already:
        print(f"already running: {', '.join(report.already)}", file=sys.stderr)
    if report.started:
        print(f"started: {', '.join(report.started)}", file=sys.stderr)
    print(f"Prefect UI: {settings.prefect_url}\nMLflow UI:  {settings.mlflow_url}")
    print("# for this shell (the CLI then runs on these servers):")
    for name, value in settings.exports().items():
        print(f"export {name}={value}")
    return 0


def _status(args) -> int:
    from visionroute import services, tracking

    rows = services.status(tracking.state_dir())
    for row in rows:
        print(row.line())
    return 0 if all(row.state == "running" for row in rows) else 3


def _down(args) -> int:
    from visionroute import services, tracking

    stopped = services.down(tracking.state_dir(), echo=lambda line: print(line, file=sys.stderr))
    print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
    return 0


def _repair(args) -> int:
    from visionroute.repair import repair

    actions = repair(args.task or None)
    flow_runs = [action["prefect_flow_run_id"] for action in actions if action.get("prefect_flow_run_id")]
    if flow_runs:  # their Prefect flow runs still say Running: mark them Crashed too
        from visionroute.prefect_api import crash_flow_runs, ensure_api

        ensure_api()
        crash_flow_runs(flow_runs)
    for action in actions:
        print(json.dumps(action))
    print(f"{len(actions)} repair(s)", file=sys.stderr)
    return 0


def _cache(args) -> int:
    """The decoded-image cache: its entries, least recently used first; --max-gb prunes to that size."""
    import time

    from visionroute import tracking
    from visionroute.training.cache import cache_entries, prune

    root = tracking.state_dir() / "cache" / "decoded"
    if args.max_gb is not None:
        for entry in prune(root, args.max_gb * 1024**3):
            print(f"removed {entry.folder.name}  {entry.bytes / 1024**2:,.0f} MB")
    entries = cache_entries(root) if root.exists() else []
    for entry in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used))
        print(
            f"{entry.folder.name}  {entry.bytes / 1024**2:>10,.0f} MB  {entry.images:>9,} images  last used {used}"
        )
    total = sum(entry.bytes for entry in entries)
    print(f"{len(entries)} entries, {total / 1024**3:.2f} GB in {root}", file=sys.stderr)
    return 0


def _backends(args) -> int:
    from visionroute.backends import list_backends

    print("\n".join(list_backends()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visionroute", description="Route image tasks by a documented framework."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    schema = commands.add_parser("schema", help="print the task spec's JSON schema")
    schema.set_defaults(handler=_schema)

    decide = commands.add_parser("decide", help="print the route the framework chooses for each spec")
    decide.add_argument("spec", nargs="+", help="task spec YAML file(s)")
    decide.add_argument("--json", action="store_true", help="machine-readable decision")
    decide.add_argument("--prices", help="price file (default: $VISIONROUTE_PRICES or the bundled one)")
    decide.add_argument(
        "--measure-domain",
        action="store_true",
        help="measure how far the images are from ImageNet even when the domain is declared (always for auto)",
    )
    decide.set_defaults(handler=_decide)

    run = commands.add_parser(
        "run", help="run the route-image-task flow for a spec (decide, train/call, track)"
    )
    run.add_argument("spec")
    run.add_argument("--prices")
    run.set_defaults(handler=_run)

    train = commands.add_parser(
        "train",
        help="run a training task on several processes/GPUs through torchrun (DDP); rank 0 tracks and registers",
    )
    train.add_argument("spec")
    train.add_argument("--prices", help="price file (default: the bundled one)")
    train.add_argument(
        "--nproc-per-node",
        type=int,
        default=0,
        help="processes per node, one per GPU (default: the spec's training.processes; auto is one per GPU)",
    )
    train.add_argument("--nnodes", type=int, default=1, help="nodes (torchrun --nnodes)")
    train.add_argument("--node-rank", type=int, default=0, help="this node's rank (static rendezvous)")
    train.add_argument(
        "--rdzv-endpoint", help="host:port of the rendezvous (multi-node; torchrun --rdzv-endpoint)"
    )
    train.set_defaults(handler=_train)

    bake = commands.add_parser(
        "bakeoff", help="train several routes on the same split and budget; the better becomes champion"
    )
    bake.add_argument("spec")
    bake.add_argument("--routes", default="finetune,scratch", help="comma-separated training routes")
    bake.add_argument("--prices", help="price file (default: the bundled one)")
    bake.set_defaults(handler=_bakeoff)

    predict = commands.add_parser("predict", help="label images with a registered model")
    predict.add_argument("--model", required=True, help="e.g. models:/ants-vs-bees@champion")
    predict.add_argument("paths", nargs="+", help="image files or folders")
    predict.add_argument("--out", help="write JSON lines here instead of stdout")
    predict.add_argument("--top-k", type=int, default=3)
    predict.set_defaults(handler=_predict)

    fit = commands.add_parser(
        "fit-test", help="measure a Vision API on a labelled sample through the spec's vision_api.label_map"
    )
    fit.add_argument("spec")
    fit.add_argument("--provider", choices=BUILTIN_PROVIDERS, help="default: the spec's")
    fit.add_argument("--sample", type=int, help="labelled images to send (default: vision_api.fit_sample)")
    fit.add_argument("--prices")
    fit.set_defaults(handler=_fit_test)

    promote = commands.add_parser(
        "promote", help="make a registered version champion, recorded with who and why"
    )
    promote.add_argument("name", help="registered model (the task's name)")
    promote.add_argument("version", help="the version to make champion")
    rollback = commands.add_parser("rollback", help="give champion back to the version it replaced")
    rollback.add_argument("name", help="registered model (the task's name)")
    for command in (promote, rollback):
        command.add_argument("--reviewer", required=True, help="who decides")
        command.add_argument("--reason", required=True, help="why, in a sentence")
        command.set_defaults(handler=_promote)
    history = commands.add_parser("history", help="who made which version champion, and when")
    history.add_argument("name", help="registered model (the task's name)")
    history.add_argument("--at", help="ISO date/time: which version was champion then, and who decided")
    history.set_defaults(handler=_history)

    up = commands.add_parser(
        "up", help="start Prefect and MLflow servers, work pools, deployments and workers (idempotent)"
    )
    up.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    up.add_argument("--prefect-port", type=int, help="Prefect UI/API port (default 4200)")
    up.add_argument("--mlflow-port", type=int, help="MLflow UI/API port (default 5000)")
    up.add_argument("--gpus", type=int, help="GPUs for the gpu pool's limit (default: as nvidia-smi lists)")
    up.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for everything to start")
    up.set_defaults(handler=_up)
    status = commands.add_parser("status", help="each component `up` started: state, pid, URL, health")
    status.set_defaults(handler=_status)
    down = commands.add_parser("down", help="stop exactly what `up` started")
    down.set_defaults(handler=_down)

    repair = commands.add_parser(
        "repair",
        help="mark runs of killed processes KILLED and remove half-registered model versions (the route flow "
        "does this for its own task)",
    )
    repair.add_argument("task", nargs="*", help="task names (default: every task in the store)")
    repair.set_defaults(handler=_repair)

    cache = commands.add_parser(
        "cache",
        help="list the decoded-image cache (runs keep it within VISIONROUTE_CACHE_MAX_GB, default 50)",
    )
    cache.add_argument(
        "--max-gb", type=float, help="first delete the least recently used entries beyond this"
    )
    cache.set_defaults(handler=_cache)

    backends = commands.add_parser("backends", help="list the registered route backends")
    backends.set_defaults(handler=_backends)
    return parser


# Errors that are the user's to fix, by module and class, with their exit code: the console shows their message
# only. Matched through sys.modules, so that reporting one never imports torch (a raised error's module is loaded).
EXPECTED_ERRORS = {
    "visionroute.spec": (("SpecError",), BAD_INPUT),
    "visionroute.data.dataset": (("DatasetError",), BAD_INPUT),
    "visionroute.decision.rules": (("CannotDecide",), BAD_INPUT),
    "visionroute.backends.base": (("BackendUnavailable",), FAILED),
    "visionroute.training.weights": (("WeightsError",), FAILED),
    "visionroute.training.launch": (("TrainingProcessesFailed",), FAILED),
    "visionroute.vision.base": (("ApiError", "ProviderConfigError"), FAILED),
    "visionroute.tracking": (("StoreError",), FAILED),
    "visionroute.prefect_api": (("PrefectApiError",), FAILED),
    "visionroute.review": (("ReviewError",), BAD_INPUT),
    "visionroute.services": (("ServiceError",), FAILED),
}


def exit_code_for(error: BaseException) -> int | None:
    """The exit code of an expected error; None for an unexpected one (it keeps its traceback)."""
    for module_name, (names, code) in EXPECTED_ERRORS.items():
        module = sys.modules.get(module_name)
        if module is not None and isinstance(error, tuple(getattr(module, name) for name in names)):
            return code
    return BAD_INPUT if isinstance(error, ValueError) else None


def _quiet_expected_tracebacks() -> None:
    """Prefect logs a traceback for every failed task and flow run; for an expected error the console gets
    the one `error:` line instead (Prefect's API log handler still records the detail with the flow run).
    Unexpected errors keep their traceback."""
    import logging

    class ExpectedErrorFilter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not (record.exc_info and exit_code_for(record.exc_info[1]) is not None)

    for name in ("", "prefect"):  # the console handlers (the API handlers sit on prefect.flow_runs/task_runs)
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not any(
                type(f).__name__ == "ExpectedErrorFilter" for f in handler.filters
            ):
                handler.addFilter(ExpectedErrorFilter())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except Exception as error:
        code = exit_code_for(error)
        if code is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
