"""The Prefect API a `visionroute run` talks to: the configured server (PREFECT_API_URL), or Prefect's temporary
(ephemeral) server, started here with a generous start-up limit and tied to this process's life.

Prefect starts the temporary server as a child process (uvicorn) and stops it at exit; a process killed with
SIGKILL runs no exit handler, so the server would be orphaned and keep serving. A small watchdog process
stops it as soon as its parent is gone.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
from pathlib import Path

STARTUP_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
DEFAULT_STARTUP_S = 180
"""Prefect's own default is 20 s, which a loaded 2-core machine misses (its database is migrated first)."""


class PrefectApiError(RuntimeError):
    """No Prefect API to run the flow against; the message says how to fix it."""


def startup_timeout() -> int:
    """$PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS when set, else 180 s."""
    value = os.environ.get(STARTUP_ENV)
    try:
        return int(float(value)) if value else DEFAULT_STARTUP_S
    except ValueError:
        raise PrefectApiError(f"{STARTUP_ENV}={value!r} is not a number of seconds; set e.g. 300") from None


def ensure_api() -> str | None:
    """Start the temporary server when no PREFECT_API_URL is set (returns its URL; None for a configured one).

    Call before the first flow: Prefect would otherwise start it lazily with its 20 s limit."""
    os.environ.setdefault(STARTUP_ENV, str(startup_timeout()))  # also for Prefect's own lazy starts
    # The temporary server's telemetry heartbeat calls out to Prefect and races the run for its SQLite file.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, get_current_settings

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    server = SubprocessASGIServer()
    if server.running:
        return server.api_url
    timeout = startup_timeout()
    home = Path(get_current_settings().home)
    from visionroute.tracking import file_lock

    try:
        # Two first runs at once would both create and migrate Prefect's database in PREFECT_HOME.
        with file_lock(home / "visionroute-ephemeral.lock"):
            server.start(timeout=timeout)
    except Exception as error:
        server.stop()
        raise PrefectApiError(
            f"the temporary Prefect server did not start within {timeout} s ({str(error)[:300]}). On a busy "
            f"machine give it longer: export {STARTUP_ENV}=600; or start a server once (`prefect server start`) "
            "and export PREFECT_API_URL=http://127.0.0.1:4200/api"
        ) from None
    watch(server.server_process.pid)
    return server.api_url


_WATCHDOG = """
import os, signal, sys, time
from visionroute.processes import start_time
parent, child, started = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the parent, which stops the server itself
while os.getppid() == parent:
    if start_time(child) != started:
        sys.exit(0)
    time.sleep(0.5)
for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
    if start_time(child) != started:
        break
    os.kill(child, sig)
    time.sleep(2)
"""


def watch(child_pid: int) -> subprocess.Popen | None:
    """Stop `child_pid` when this process dies, however it dies (a watchdog that outlives only its parent)."""
    from visionroute.processes import start_time

    started = start_time(child_pid)
    if started is None:  # already gone: nothing to stop
        return None
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(child_pid), str(started)],
        stdin=subprocess.DEVNULL,
        close_fds=True,
    )

    def stop() -> None:
        watchdog.terminate()
        watchdog.wait()

    atexit.register(stop)  # runs before Prefect's own exit handler stops the server (registered earlier)
    return watchdog


def crash_flow_runs(flow_run_ids: list[str]) -> None:
    """The killed runs' Prefect flow runs (and their sub-flows) still say Running: mark them Crashed."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    if not flow_run_ids:
        return
    message = "its process was killed; marked Crashed by the next run of the task (visionroute repair)"
    ids = [UUID(flow_run_id) for flow_run_id in flow_run_ids]
    with get_client(sync_client=True) as client:
        runs = []
        for flow_run_id in ids:
            try:
                runs.append(client.read_flow_run(flow_run_id))
            except ObjectNotFound:  # recorded by another Prefect server
                continue
        runs += client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=ids))
        )
        for run in runs:
            if run.state and not run.state.is_final():
                client.set_flow_run_state(run.id, Crashed(message=message), force=True)
