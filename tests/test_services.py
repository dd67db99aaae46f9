"""`visionroute up` / `status` / `down` for real: servers, pools, deployments and workers on free ports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import api, free_port, wait_for

from visionroute import services, tracking

BIN = Path(sys.executable).parent


def visionroute(state: Path, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "VISIONROUTE_STATE": str(state)}
    return subprocess.run(
        [str(BIN / "visionroute"), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def recorded(state: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (state / "services").glob("*.json") if p.stem != "up"}


def port_free(port: int) -> bool:
    return services._port_free("127.0.0.1", port)


def test_up_is_idempotent_recovers_and_down_stops_exactly_what_it_started(tmp_path):
    state = tmp_path / "state"
    prefect_port, mlflow_port = free_port(), free_port()
    bystander = subprocess.Popen(["sleep", "600"])  # a process `down` must leave alone
    try:
        first = visionroute(
            state, "up", "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)
        )
        assert first.returncode == 0, first.stderr[-3000:]
        assert f"Prefect UI: http://127.0.0.1:{prefect_port}" in first.stdout
        assert f"MLflow UI:  http://127.0.0.1:{mlflow_port}" in first.stdout
        assert f"export PREFECT_API_URL=http://127.0.0.1:{prefect_port}/api" in first.stdout
        assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{mlflow_port}" in first.stdout
        prefect_api = f"http://127.0.0.1:{prefect_port}/api"

        # The UI in a browser is told the right API address, whatever the port.
        assert api(f"http://127.0.0.1:{prefect_port}/ui-settings")["api_url"] == prefect_api
        pools = {name: api(f"{prefect_api}/work_pools/{name}") for name in ("cpu", "gpu")}
        assert pools["cpu"]["type"] == pools["gpu"]["type"] == "process"
        assert pools["gpu"]["concurrency_limit"] == max(1, services.gpu_count())
        deployments = {d["name"]: d for d in api(f"{prefect_api}/deployments/filter", {})}
        assert deployments["ants-vs-bees-weekly"]["work_pool_name"] == "cpu"
        # The MLflow server keeps its runs in SQLite under the state folder and serves artifacts itself.
        assert api(f"http://127.0.0.1:{mlflow_port}/api/2.0/mlflow/experiments/search?max_results=5")
        assert (state / "mlflow.db").exists() and (state / "prefect" / "prefect.db").exists()
        for name in ("prefect-server", "mlflow-server", "worker-cpu", "worker-gpu", "deploy"):
            assert (state / "logs" / f"{name}.log").stat().st_size > 0

        # The CLI in a shell without the exports tracks through the running MLflow server (same store).
        assert tracking.tracking_uri() == f"http://127.0.0.1:{mlflow_port}"

        rows = {row.name: row for row in services.status(state)}
        assert {name: row.state for name, row in rows.items()} == dict.fromkeys(rows, "running")
        assert rows["worker-cpu"].detail == "worker online"
        status = visionroute(state, "status")
        assert status.returncode == 0 and "prefect-server" in status.stdout

        # A second `up` (ports remembered) starts nothing.
        pids = {name: r["pid"] for name, r in recorded(state).items()}
        again = visionroute(state, "up")
        assert again.returncode == 0, again.stderr[-3000:]
        assert "already running: prefect-server, mlflow-server, worker-cpu, worker-gpu" in again.stderr
        assert {name: r["pid"] for name, r in recorded(state).items()} == pids

        # An unclean death: `status` says stale, `up` recovers it and restarts only that component.
        os.killpg(pids["worker-gpu"], signal.SIGKILL)
        rows = {row.name: row for row in services.status(state)}
        assert rows["worker-gpu"].state == "stale"
        recovered = visionroute(state, "up")
        assert recovered.returncode == 0, recovered.stderr[-3000:]
        assert "recovered worker-gpu" in recovered.stderr and "started: worker-gpu" in recovered.stderr
        assert recorded(state)["worker-gpu"]["pid"] != pids["worker-gpu"]
        assert recorded(state)["prefect-server"]["pid"] == pids["prefect-server"]
        groups = [r["pid"] for r in recorded(state).values()]
    finally:
        stopped = visionroute(state, "down")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "stopped: worker-gpu, worker-cpu, mlflow-server, prefect-server" in stopped.stdout
    assert not recorded(state)
    for pgid in groups:
        assert not services._group_members(pgid, 0), f"process group {pgid} outlived `down`"
    assert port_free(prefect_port) and port_free(mlflow_port)
    assert tracking.tracking_uri() == f"sqlite:///{state / 'mlflow.db'}"
    assert bystander.poll() is None  # untouched
    bystander.kill()
    assert visionroute(state, "down").stdout.strip() == "nothing was running"
    assert visionroute(state, "status").returncode == 3


def test_a_port_held_by_another_program_is_a_clear_error_and_starts_nothing(tmp_path):
    state = tmp_path / "state"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        done = visionroute(state, "up", "--prefect-port", str(taken), "--mlflow-port", str(free_port()))
    assert done.returncode == 1
    assert f"port {taken} on 127.0.0.1 is held by another program" in done.stderr
    assert "--prefect-port" in done.stderr
    assert not recorded(state)


def test_the_same_port_twice_is_refused(tmp_path):
    port = free_port()
    with pytest.raises(services.ServiceError, match="give them different ports"):
        services.up(
            services.Settings(tmp_path / "state", prefect_port=port, mlflow_port=port), echo=lambda _: None
        )


def stubborn_service(tmp_path: Path, name: str, heeded: int, term_again_after: float | None = None) -> dict:
    """A service stuck in a named function that ignores SIGTERM until the `heeded`-th one (0: never)."""
    settings = services.Settings(state=tmp_path / "state")
    settings.services_dir.mkdir(parents=True, exist_ok=True)
    stuck = (
        "import signal, sys, time\n"
        "received = []\n"
        f"signal.signal(signal.SIGTERM, lambda *_: received.append(1) or len(received) == {heeded} and sys.exit(0))\n"
        "def waiting_for_something_that_never_comes():\n"
        "    while True: time.sleep(0.1)\n"
        "print('ready'.upper(), flush=True)\n"  # the log's header holds the argv: wait for what only runs
        "waiting_for_something_that_never_comes()\n"
    )
    argv = [sys.executable, "-c", stuck]
    component = services.Component(name, argv, services.base_env(settings), term_again_after=term_again_after)
    record = services._spawn(component, settings)
    assert wait_for(lambda: "READY" in Path(record["log"]).read_text(), timeout=20)
    return record


def test_a_service_that_ignores_sigterm_is_killed_and_its_log_says_where_it_was_stuck(tmp_path):
    """A hung service is stopped anyway, and the stacks it hung in are in its log, for whoever reads why
    `down` had to kill it."""
    record = stubborn_service(tmp_path, "stubborn", heeded=0)
    outcome = services._stop_group(record, timeout=1.0)
    assert outcome.startswith("killed after") and record["log"] in outcome, outcome
    assert not services._group_members(record["pid"], 0)
    log = Path(record["log"]).read_text()
    stacks = log.partition("Fatal Python error: Aborted")[2]
    assert "in waiting_for_something_that_never_comes" in stacks, log
    assert not list(Path(services.REPO).glob("core*")), "SIGABRT left a core file in the project"


def test_a_worker_that_loses_the_first_sigterm_gets_a_second(tmp_path):
    """Prefect's worker takes a second SIGTERM as "stop now": `down` sends it to a worker still there after its
    `term_again_after`, long before the group's grace runs out."""
    record = stubborn_service(tmp_path, "worker-stubborn", heeded=2, term_again_after=0.5)
    assert record["term_again_after"] == 0.5
    outcome = services._stop_group(record, timeout=30.0)
    assert outcome.endswith("(after a second SIGTERM)") and float(outcome.split()[1]) < 10, outcome
    assert not services._group_members(record["pid"], 0)
    assert all(c.term_again_after for c in services.components(services.Settings(tmp_path)) if c.pool)
