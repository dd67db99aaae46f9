"""`visionroute up` / `status` / `down`: the Prefect server, the MLflow server, the work pools, the deployments
and one worker per pool, as processes this module starts, records and stops.

Each process is started in its own session (its pid is its process group), with its pid and start time in
`<state>/services/<name>.json` and its output in `<state>/logs/<name>.log`. `down` signals exactly the
process groups recorded there, so it never touches a process it did not start; a pid file whose process
died (a reboot, `kill -9`) is recognised by the start time and recovered by the next `up`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from visionroute.processes import start_time

REPO = Path(__file__).resolve().parents[1]
DEFAULT_HOST, DEFAULT_PREFECT_PORT, DEFAULT_MLFLOW_PORT = "127.0.0.1", 4200, 5000
POOLS = {"cpu": "process", "gpu": "process"}
DEPLOYMENTS_FILE = "deployments/prefect.yaml"
# Prefect's server takes 30 s and more to start on two busy cores; nothing here should give up before it.
START_TIMEOUT_S = 240.0


class ServiceError(RuntimeError):
    """`up` or `down` cannot do what was asked; the message names the problem and the fix."""


@dataclass(frozen=True)
class Settings:
    """Where `up` runs everything: the state folder, the interface and the two ports."""

    state: Path
    host: str = DEFAULT_HOST
    prefect_port: int = DEFAULT_PREFECT_PORT
    mlflow_port: int = DEFAULT_MLFLOW_PORT
    gpus: int = 0
    """GPUs on this machine: the gpu pool runs at most one job per GPU (at least one)."""

    @property
    def prefect_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"{self.prefect_url}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def services_dir(self) -> Path:
        return self.state / "services"

    @property
    def logs_dir(self) -> Path:
        return self.state / "logs"

    def exports(self) -> dict[str, str]:
        """What a shell needs to talk to these servers (the `export` lines `up` prints)."""
        return {"PREFECT_API_URL": self.prefect_api_url, "MLFLOW_TRACKING_URI": self.mlflow_url}

    def to_dict(self) -> dict:
        return {
            "host": self.host,
            "prefect_port": self.prefect_port,
            "mlflow_port": self.mlflow_port,
            "gpus": self.gpus,
        }


@dataclass
class Component:
    name: str
    argv: list[str]
    env: dict[str, str]
    port: int | None = None
    url: str | None = None
    health_url: str | None = None
    pool: str | None = None
    term_again_after: float | None = None
    """Seconds after which `down` sends the leader, once it is alone in its group, a second SIGTERM, which
    Prefect's CLI takes as "stop now"."""


@dataclass
class ComponentStatus:
    name: str
    state: str
    """running | stopped | unhealthy | stale (a pid file whose process is gone)"""
    pid: int | None = None
    url: str | None = None
    detail: str = ""

    def line(self) -> str:
        pid = str(self.pid) if self.pid else "-"
        return f"{self.name:15} {self.state:10} pid {pid:>8}  {self.url or '':28} {self.detail}".rstrip()


@dataclass
class UpReport:
    settings: Settings
    started: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)


# ---- processes ----------------------------------------------------------------------------------------------


def _group_members(pgid: int, not_before: int) -> list[int]:
    """Live processes in process group `pgid` started no earlier than its recorded leader: ours, even when
    the leader itself died and left children behind."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid and int(fields[19]) >= not_before:
            members.append(int(entry.name))
    return members


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _alive(record: dict) -> bool:
    """The recorded process is the one we started (same pid and start time), still running."""
    return start_time(record["pid"]) == record["start_time"]


def _leftovers(record: dict) -> list[int]:
    return _group_members(record["pid"], record["start_time"])


def _stop_group(record: dict, timeout: float = 30.0) -> str:
    """SIGTERM the recorded process group (and its leader a second one after the record's `term_again_after`).
    Whatever is left after `timeout` gets SIGABRT, which makes a Python process write every thread's stack to
    its log before it dies (services run with PYTHONFAULTHANDLER), then SIGKILL. Says how it ended."""
    pgid = record["pid"]
    started, forced, again = time.monotonic(), False, False
    again_at = started + record["term_again_after"] if record.get("term_again_after") else math.inf
    # A group started by an older `up` may dump core on SIGABRT: it goes straight to SIGKILL.
    abort = [(signal.SIGABRT, 5.0)] if record.get("stacks_on_abort") else []
    for sig, wait in [(signal.SIGTERM, timeout), *abort, (signal.SIGKILL, 10.0)]:
        members = _leftovers(record)
        if not members:
            break
        forced = forced or sig != signal.SIGTERM
        if _alive(record):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
        else:  # the leader is gone: signal its orphans one by one (the group id may be reused otherwise)
            for pid in members:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and (left := _leftovers(record)):
            # Only once the leader is alone: a busy worker streams its flow runs' output, which they still print
            # while closing their runs after the first SIGTERM.
            if sig == signal.SIGTERM and time.monotonic() > again_at and left == [pgid]:
                again_at, again = math.inf, True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pgid, signal.SIGTERM)
            time.sleep(0.2)
    with contextlib.suppress(ChildProcessError):  # started by this very process: reap it, no zombie left
        os.waitpid(pgid, os.WNOHANG)
    if _leftovers(record):
        raise ServiceError(f"process group {pgid} did not stop; kill it by hand: kill -9 -- -{pgid}")
    took = time.monotonic() - started
    if not forced:
        return f"in {took:.1f} s" + (" (after a second SIGTERM)" if again else "")
    where = f"; where it was stuck is at the end of {record['log']}" if abort else ""
    return f"killed after {took:.0f} s (SIGTERM was not enough{where})"


def _spawn(component: Component, settings: Settings) -> dict:
    settings.logs_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.logs_dir / f"{component.name}.log"
    with open(log_path, "ab") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(component.argv)}\n".encode())
        log.flush()
        process = subprocess.Popen(
            component.argv,
            env=component.env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: `down` stops it and its children, nothing else
        )
    # SIGABRT (see _stop_group) must not leave core files in the project; set before it has started anything.
    resource.prlimit(process.pid, resource.RLIMIT_CORE, (0, 0))
    start = None
    for _ in range(50):  # /proc/PID/stat appears as soon as the fork returns; be tolerant anyway
        start = start_time(process.pid)
        if start is not None:
            break
        time.sleep(0.02)
    record = {
        "name": component.name,
        "pid": process.pid,
        "start_time": start,
        "argv": component.argv,
        "port": component.port,
        "url": component.url,
        "log": str(log_path),
        "term_again_after": component.term_again_after,
        "stacks_on_abort": component.env.get("PYTHONFAULTHANDLER") == "1",  # and no core files (prlimit)
    }
    (settings.services_dir / f"{component.name}.json").write_text(json.dumps(record, indent=2))
    return record


# ---- HTTP -----------------------------------------------------------------------------------------------------


def _http(
    url: str, body: object | None = None, method: str | None = None, timeout: float = 10.0, retry_s: float = 0
):
    """JSON over HTTP. With `retry_s`, a busy server (5xx: SQLite locked under load, or not answering) is
    asked again with backoff for that long; only for requests that are safe to repeat."""
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
        method=method,
    )
    deadline, pause = time.monotonic() + retry_s, 0.5
    while True:
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                text = response.read().decode()
            break
        except urllib.error.HTTPError as error:
            if error.code < 500 or time.monotonic() + pause > deadline:
                raise
        except OSError:
            if time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 5.0)
    return json.loads(text) if text.strip().startswith(("{", "[", "true", "false")) else text


def _healthy(url: str | None) -> bool:
    if url is None:
        return True
    try:
        _http(url, timeout=5)
        return True
    except (OSError, ValueError):
        return False


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


# ---- what `up` runs ---------------------------------------------------------------------------------------------


def _bin(name: str) -> str:
    """The console script installed beside this interpreter (.venv/bin/prefect), so nothing needs PATH."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise ServiceError(f"{path} is missing: install the project into this environment (make install)")
    return str(path)


def base_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "VISIONROUTE_STATE": str(settings.state),
            "PREFECT_HOME": str(settings.state / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "PWD": str(REPO),
            # A service that ignores SIGTERM is stopped with SIGABRT: Python then logs where it was stuck.
            "PYTHONFAULTHANDLER": "1",
        }
    )
    return env


def components(settings: Settings) -> list[Component]:
    """Everything `up` starts, in start order (`down` stops in reverse)."""
    env = base_env(settings)
    prefect_env = {
        **env,
        "PREFECT_API_URL": settings.prefect_api_url,
        # Where the UI, running in the browser, finds the API; without it a non-default port shows
        # "Unable to connect to Prefect server".
        "PREFECT_UI_API_URL": settings.prefect_api_url,
    }
    worker_env = {
        **prefect_env,
        "MLFLOW_TRACKING_URI": settings.mlflow_url,
        # Pick up a run triggered from the UI within seconds, not the default 10 s.
        "PREFECT_WORKER_QUERY_SECONDS": "3",
    }
    mlflow_db = settings.state / "mlflow.db"
    artifacts = settings.state / "mlflow-artifacts"
    listed = [
        Component(
            "prefect-server",
            [
                _bin("prefect"),
                "server",
                "start",
                "--host",
                settings.host,
                "--port",
                str(settings.prefect_port),
            ],
            prefect_env,
            settings.prefect_port,
            settings.prefect_url,
            f"{settings.prefect_api_url}/health",
        ),
        Component(
            "mlflow-server",
            [
                _bin("mlflow"),
                "server",
                "--host",
                settings.host,
                "--port",
                str(settings.mlflow_port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{mlflow_db}",
                "--serve-artifacts",
                "--artifacts-destination",
                str(artifacts),
            ],
            env,
            settings.mlflow_port,
            settings.mlflow_url,
            f"{settings.mlflow_url}/health",
        ),
    ]
    for pool, kind in POOLS.items():
        listed.append(
            Component(
                f"worker-{pool}",
                [
                    _bin("prefect"),
                    "worker",
                    "start",
                    "--pool",
                    pool,
                    "--type",
                    kind,
                    "--name",
                    f"visionroute-{pool}",
                    # The pool is created (with its limit) by `up`; a worker must never create it another way.
                    "--no-create-pool-if-not-found",
                ],
                worker_env,
                pool=pool,
                # An idle worker stops in under a second, but after a day of runs (every e2e run, Prefect 3.9)
                # the first SIGTERM's cancellation is lost and it keeps polling until killed. Its flow runs got
                # that SIGTERM too; the second one waits until they have exited.
                term_again_after=5.0,
            )
        )
    return listed


def _record_path(settings: Settings, name: str) -> Path:
    return settings.services_dir / f"{name}.json"


def _settings_file(state: Path) -> Path:
    return state / "services" / "up.json"


def running_settings(state: Path) -> Settings | None:
    """The settings of the `up` whose processes are recorded in this state folder, if any."""
    data = _read_record(_settings_file(state))
    return Settings(state=state, **data) if data else None


def served_mlflow_url(state: Path) -> str | None:
    """The MLflow server `up` runs on this state folder, while it runs: the CLI then tracks through it, so an
    experiment the server created (its artifacts served as mlflow-artifacts:/) stays usable from the CLI."""
    settings = running_settings(state)
    record = _read_record(state / "services" / "mlflow-server.json")
    return settings.mlflow_url if settings and record and _alive(record) else None


def gpu_count() -> int:
    """GPUs nvidia-smi lists (0 without an NVIDIA driver); cheap, no torch import."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listed.splitlines() if line.startswith("GPU "))


def _wait_healthy(component: Component, record: dict, deadline: float) -> None:
    while not _healthy(component.health_url):
        if not _alive(record):
            raise ServiceError(
                f"{component.name} exited during start-up; its log says why: {record['log']}\n"
                + _tail(Path(record["log"]))
            )
        if time.monotonic() > deadline:
            raise ServiceError(
                f"{component.name} did not answer {component.health_url} within {START_TIMEOUT_S:.0f} s; "
                f"see {record['log']}, or retry with a longer --timeout on a busy machine"
            )
        time.sleep(0.5)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join("    " + line for line in path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def ensure_pools(settings: Settings) -> None:
    """Create the work pools, or leave them as they are; the gpu pool runs one job per GPU."""
    from prefect.workers.process import ProcessWorker

    api = settings.prefect_api_url
    limits = {"cpu": None, "gpu": max(1, settings.gpus)}
    try:
        for name, kind in POOLS.items():
            try:
                _http(f"{api}/work_pools/{name}", retry_s=60)
                exists = True
            except urllib.error.HTTPError as error:
                if error.code != 404:
                    raise
                exists = False
            if not exists:
                try:
                    _http(
                        f"{api}/work_pools/",
                        {
                            "name": name,
                            "type": kind,
                            "description": "visionroute: "
                            + ("CPU jobs" if name == "cpu" else "GPU jobs, one per GPU at a time"),
                            "base_job_template": ProcessWorker.get_default_base_job_template(),
                            "concurrency_limit": limits[name],
                        },
                        retry_s=60,  # a repeat after a create that did land answers 409, handled below
                    )
                    continue
                except urllib.error.HTTPError as error:
                    if error.code != 409:  # 409: created meanwhile (another `up`); set its limit below
                        raise
            _http(f"{api}/work_pools/{name}", {"concurrency_limit": limits[name]}, method="PATCH", retry_s=60)
    except OSError as error:
        raise ServiceError(
            f"the Prefect server at {api} did not accept the work pools ({error}); see "
            f"{settings.logs_dir / 'prefect-server.log'}, then run `visionroute up` again"
        ) from None


def apply_deployments(settings: Settings) -> None:
    """`prefect deploy --all` from the repository root, against this server (never an ephemeral one)."""
    env = {**base_env(settings), "PREFECT_API_URL": settings.prefect_api_url}
    log_path = settings.logs_dir / "deploy.log"
    with open(log_path, "ab") as log:
        done = subprocess.run(
            [_bin("prefect"), "--no-prompt", "deploy", "--prefect-file", DEPLOYMENTS_FILE, "--all"],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=600,
        )
    if done.returncode != 0:
        raise ServiceError(
            f"applying {DEPLOYMENTS_FILE} failed (exit {done.returncode}); see {log_path}\n" + _tail(log_path)
        )


def _wait_worker_online(settings: Settings, pool: str, record: dict, deadline: float) -> None:
    url = f"{settings.prefect_api_url}/work_pools/{pool}/workers/filter"
    while True:
        try:
            workers = _http(url, {})
        except OSError:
            workers = []
        if any(w["name"] == f"visionroute-{pool}" and w.get("status") == "ONLINE" for w in workers):
            return
        if not _alive(record):
            raise ServiceError(
                f"worker-{pool} exited during start-up; see {record['log']}\n" + _tail(Path(record["log"]))
            )
        if time.monotonic() > deadline:
            raise ServiceError(f"worker-{pool} did not reach the Prefect server; see {record['log']}")
        time.sleep(0.5)


def _check_ports(settings: Settings, starting: list[Component]) -> None:
    if settings.prefect_port == settings.mlflow_port:
        raise ServiceError(
            f"--prefect-port and --mlflow-port are both {settings.prefect_port}; give them different ports"
        )
    for component in starting:
        if component.port and not _port_free(settings.host, component.port):
            flag = "--prefect-port" if component.name == "prefect-server" else "--mlflow-port"
            raise ServiceError(
                f"port {component.port} on {settings.host} is held by another program (not started by "
                f"visionroute up); stop it, or choose another port with {flag}"
            )


def up(settings: Settings, echo: Callable[[str], None] = print, timeout: float = START_TIMEOUT_S) -> UpReport:
    """Start whatever of the set is not running; report what already runs. On a failure, stop what this call
    started and raise: nothing is left half up."""
    settings.services_dir.mkdir(parents=True, exist_ok=True)
    settings.logs_dir.mkdir(parents=True, exist_ok=True)
    report = UpReport(settings)
    current = running_settings(settings.state)
    wanted = components(settings)
    to_start: list[Component] = []
    for component in wanted:
        path = _record_path(settings, component.name)
        record = _read_record(path)
        if record and _alive(record):
            if current and current.to_dict() != settings.to_dict():
                raise ServiceError(
                    f"visionroute already runs here with {current.to_dict()}; run `visionroute down` first "
                    "to change its host, ports or GPUs"
                )
            report.already.append(component.name)
            continue
        if record:  # an unclean shutdown: the process is gone (or only orphans of it remain)
            _stop_group(record)
            path.unlink()
            report.recovered.append(component.name)
            echo(f"recovered {component.name}: its recorded process {record['pid']} was no longer running")
        to_start.append(component)
    if not to_start:
        return report
    _check_ports(settings, to_start)
    _settings_file(settings.state).write_text(json.dumps(settings.to_dict(), indent=2))
    started: list[tuple[Component, dict]] = []
    deadline = time.monotonic() + timeout
    try:
        servers = [c for c in to_start if c.health_url]
        for component in servers:
            echo(
                f"starting {component.name} on {component.url} (log: {settings.logs_dir}/{component.name}.log)"
            )
            started.append((component, _spawn(component, settings)))
        for component, record in started:
            _wait_healthy(component, record, deadline)
        if any(c.name == "prefect-server" for c in servers) or any(c.pool for c in to_start):
            echo("creating work pools cpu and gpu (if missing) and applying deployments/prefect.yaml")
            ensure_pools(settings)
            apply_deployments(settings)
        workers = [c for c in to_start if c.pool]
        for component in workers:
            echo(f"starting {component.name} (log: {settings.logs_dir}/{component.name}.log)")
            started.append((component, _spawn(component, settings)))
        for component, record in started:
            if component.pool:
                _wait_worker_online(settings, component.pool, record, deadline)
    except BaseException:
        for component, record in reversed(started):
            with contextlib.suppress(ServiceError):
                _stop_group(record)
            _record_path(settings, component.name).unlink(missing_ok=True)
        if not report.already:
            _settings_file(settings.state).unlink(missing_ok=True)
        raise
    report.started = [component.name for component, _ in started]
    return report


def status(state: Path) -> list[ComponentStatus]:
    """Each component `up` manages: running (and healthy), unhealthy, stopped, or stale."""
    settings = running_settings(state) or Settings(state=state)
    rows = []
    workers_online: dict[str, str] = {}
    for component in components(settings):
        record = _read_record(_record_path(settings, component.name))
        if record is None:
            rows.append(ComponentStatus(component.name, "stopped", url=component.url))
            continue
        if not _alive(record):
            rows.append(
                ComponentStatus(
                    component.name,
                    "stale",
                    record["pid"],
                    component.url,
                    "recorded process is gone; `up` recovers",
                )
            )
            continue
        if component.pool:
            if not workers_online:
                workers_online = _worker_states(settings)
            state_of = workers_online.get(f"visionroute-{component.pool}", "not registered")
            ok = state_of == "ONLINE"
            rows.append(
                ComponentStatus(
                    component.name,
                    "running" if ok else "unhealthy",
                    record["pid"],
                    f"pool {component.pool}",
                    f"worker {state_of.lower()}",
                )
            )
            continue
        ok = _healthy(component.health_url)
        rows.append(
            ComponentStatus(
                component.name,
                "running" if ok else "unhealthy",
                record["pid"],
                component.url,
                "healthy" if ok else f"no answer from {component.health_url}",
            )
        )
    return rows


def _worker_states(settings: Settings) -> dict[str, str]:
    states = {}
    for pool in POOLS:
        try:
            for worker in _http(f"{settings.prefect_api_url}/work_pools/{pool}/workers/filter", {}):
                states[worker["name"]] = worker.get("status", "?")
        except (OSError, ValueError):
            pass
    return states


def down(state: Path, echo: Callable[[str], None] = print) -> list[str]:
    """Stop exactly the process groups `up` recorded in this state folder, workers first."""
    settings = running_settings(state) or Settings(state=state)
    stopped = []
    for component in reversed(components(settings)):
        path = _record_path(settings, component.name)
        record = _read_record(path)
        if record is None:
            continue
        if _leftovers(record):
            echo(f"stopping {component.name} (process group {record['pid']})")
            echo(f"stopped {component.name} {_stop_group(record)}")
            stopped.append(component.name)
        path.unlink()
    _settings_file(state).unlink(missing_ok=True)
    return stopped
