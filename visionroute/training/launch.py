"""Training on several processes under torchrun (DDP: NCCL on GPUs, gloo on CPUs).

From the route flow: the flow plans once, then `train_under_torchrun` writes what it planned (spec, decision,
dataset, the parent MLflow run) to the run's folder and starts

    torchrun --nproc-per-node N -m visionroute.training.launch --context FILE

In every rank the training backend runs with that context: rank 0 trains, tracks, checkpoints and registers;
the others train alongside it. Rank 0 reports each epoch to `progress.jsonl` and its result to `result.json`,
which the flow reads back (its progress bar, its result table); their output goes to `output.log`, which the
flow forwards to its log. Each rank watches the flow's process and ends if it dies, so a killed flow leaves no
training behind (the next run's repair then records its runs KILLED).

On the other nodes of a multi-node run, `visionroute train SPEC --node-rank K` starts the ranks with the spec
instead of a context: they plan the same task themselves (the same validation, the same seeded split).
torchrun's own settings (nnodes, node rank, rendezvous) reach it as its PET_* environment variables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, replace
from pathlib import Path

from visionroute.processes import alive
from visionroute.training import distributed

PARENT_PID = "VISIONROUTE_PARENT_PID"


class TrainingProcessesFailed(RuntimeError):
    """The torchrun processes ended with an error; the message is rank 0's error or the output's last lines."""


def torchrun_command(processes: int, *target: str) -> list[str]:
    """torchrun on this node: single-node (--standalone), or the multi-node settings in PET_* (static
    rendezvous: node 0 holds rank 0, which runs with the flow)."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}"]
    if not os.environ.get("PET_RDZV_ENDPOINT"):
        command.append("--standalone")
    return [*command, "-m", "visionroute.training.launch", *target]


def train_under_torchrun(context, route: str, processes: int, backend_config: dict | None = None):
    """Run the training backend for `context` in `processes` ranks; rank 0's BackendResult comes back."""
    from visionroute.backends.base import BackendResult

    folder = Path(context.work_dir) / "torchrun"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in ("progress.jsonl", "result.json", "error.json", "output.log"):
        (folder / stale).unlink(missing_ok=True)
    with (folder / "context.pkl").open("wb") as out:
        pickle.dump(
            {"route": route, "backend": backend_config or {}, "context": replace(context, on_progress=None)},
            out,
        )
    # Per-step bars would fill the output file with carriage returns: the flow shows epochs and its progress bar.
    env = {**os.environ, PARENT_PID: str(os.getpid()), "VISIONROUTE_NO_BAR": "1"}
    print(f"training {route} in {processes} processes (torchrun, DDP)", flush=True)
    # The ranks write to a file, not a pipe: were this process killed, a pipe would break their next print.
    with (folder / "output.log").open("wb") as output:
        proc = subprocess.Popen(
            torchrun_command(processes, "--context", str(folder / "context.pkl")),
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # torchrun and its ranks are stopped as one group if this process is
        )
    # The last lines, for an error message: torchrun's report of a dead rank (its log line, then its own
    # traceback and failure table) alone is about 40.
    tail: deque[str] = deque(maxlen=100)
    progress, output = _Follow(folder / "progress.jsonl"), _Follow(folder / "output.log")

    def relay() -> None:
        for line in progress.new_lines():
            if context.on_progress:
                context.on_progress(json.loads(line))
        for line in output.new_lines():  # into this process's output: the flow's log
            tail.append(line)
            print(line, flush=True)

    try:
        while proc.poll() is None:
            relay()
            time.sleep(0.5)
    finally:
        if proc.poll() is None:  # this process is being stopped (Ctrl-C, a cancelled flow run)
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
        # torchrun has exited; had it been killed, its ranks would not have: none outlives it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    relay()
    if proc.returncode != 0:
        raise _failure(folder / "error.json", processes, proc.returncode, tail)
    return BackendResult(**json.loads((folder / "result.json").read_text()))


class _Follow:
    """The complete lines another process appends to a file, as they come (a partial last line waits)."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def new_lines(self) -> list[str]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as file:
            file.seek(self.offset)
            chunk = file.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        return complete.decode(errors="replace").splitlines()


def _failure(error_file: Path, processes: int, code: int, tail: deque) -> Exception:
    """Rank 0's own error again when it is an expected one (it keeps its class, so the CLI prints its one
    line); otherwise what rank 0 said and the ranks' last output, where a peer's death shows (a rank killed
    for memory leaves rank 0 with only a broken connection to report)."""
    said = ""
    if error_file.exists():
        error = json.loads(error_file.read_text())
        expected = _expected_error(error["module"], error["type"])
        if expected is not None:
            return expected(error["message"])
        said = f"; rank 0: {error['type']}: {error['message']}"
    return TrainingProcessesFailed(
        f"training in {processes} processes failed (torchrun exit code {code}){said}\n"
        + "\n".join(_report(tail))
        + f"\n(the ranks' whole output: {error_file.parent / 'output.log'})\n"
        "Each finished epoch is checkpointed: running the same task again, with the same number of processes, "
        "resumes from the last one."
    )


REPORT_RULE = re.compile(r"^\s*={20,}\s*$")
REPORT_FALLBACK_LINES = 20


def _report(tail: deque) -> list[str]:
    """What of the ranks' last output goes into the error: torchrun's failure report (the block between its
    last two rules, which names each failed rank and its exit code) when there is one, else the last lines.
    The flow's log already holds the whole output, relayed line by line, and Prefect logs a failed flow's
    error twice (the sub-flow's and the flow's): the 100-line tail made that 300 lines."""
    lines = list(tail)
    rules = [i for i, line in enumerate(lines) if REPORT_RULE.match(line)]
    if len(rules) >= 2:
        return lines[rules[-2] : rules[-1] + 1]
    return lines[-REPORT_FALLBACK_LINES:]


def _expected_error(module: str, name: str):
    from visionroute.cli import EXPECTED_ERRORS

    if name in EXPECTED_ERRORS.get(module, ((), 0))[0]:
        __import__(module)
        return getattr(sys.modules[module], name)
    return None


def _watch_parent() -> None:
    """End this rank when the process that started torchrun is gone (killed): no orphaned training."""
    pid = int(os.environ[PARENT_PID])
    # Rank 0 goes first: were another rank to go first, rank 0 would see a collective fail and record its run
    # FAILED with a peer's connection error, where KILLED (what the next run's repair records) is the truth.
    grace = 0.0 if distributed.rank() == 0 else 3.0

    def watch() -> None:
        while alive(pid):
            time.sleep(0.5)
        time.sleep(grace)
        os._exit(70)

    threading.Thread(target=watch, daemon=True).start()


def lead_or_follow(context_file: Path) -> None:
    """A rank started from the flow: the planned context; rank 0 reports progress, result and error."""
    from visionroute.backends import create_backend

    folder = context_file.parent
    with context_file.open("rb") as source:
        payload = pickle.load(source)
    context = payload["context"]
    backend = create_backend(payload["route"], **payload["backend"])
    if not distributed.is_main():
        backend.run(context)
        return

    def on_progress(record: dict) -> None:
        with (folder / "progress.jsonl").open("a") as out:
            out.write(json.dumps(record, default=str) + "\n")

    try:
        outcome = backend.run(replace(context, on_progress=on_progress))
    except Exception as error:
        (folder / "error.json").write_text(
            json.dumps(
                {"module": type(error).__module__, "type": type(error).__name__, "message": str(error)}
            )
        )
        raise
    staging = folder / "result.json.tmp"
    staging.write_text(json.dumps(asdict(outcome), default=str))
    os.replace(staging, folder / "result.json")


def follow_spec(spec_path: str, prices_path: str | None) -> None:
    """A rank on another node: the same plan as node 0's flow made, the same backend, no tracking."""
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
    if distributed.is_main():
        raise BackendUnavailable("rank 0 runs on node 0 (--node-rank 0), where the flow runs; start it there")
    create_backend(route).run(context)


def main(argv: list[str] | None = None) -> int:
    # torchrun's failure report then carries each failed rank's traceback (the error keeps only that report).
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(_main)(argv)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="visionroute.training.launch")
    parser.add_argument("spec", nargs="?", help="another node's ranks: the task spec they plan themselves")
    parser.add_argument("--context", type=Path, help="ranks started by the flow: the context it planned")
    parser.add_argument("--prices")
    args = parser.parse_args(argv)
    if PARENT_PID in os.environ:
        _watch_parent()
    # torchrun stops the other ranks with SIGTERM when one fails (and the flow's group on Ctrl-C or a cancel):
    # as an exception, so that rank 0's run is recorded FAILED rather than left RUNNING.
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
    distributed.setup()
    try:
        if args.context:
            lead_or_follow(args.context)
        else:
            follow_spec(args.spec, args.prices)
        return 0
    finally:
        distributed.teardown()


if __name__ == "__main__":
    sys.exit(main())
