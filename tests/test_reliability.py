"""Nothing half-done after a failure: one MLflow run lifecycle, stores checked first, clear errors, repair after
`kill -9`, serialised first runs. Real MLflow (SQLite in tmp), real Prefect, real processes and signals."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, make_image, scratch_task, wait_for, write_spec
from mlflow.tracking import MlflowClient
from visionroute.flows.route import route_image_task

from visionroute import model_registry, tracking
from visionroute.cli import main

pytestmark = pytest.mark.flow

PRIVATE_TAGS = "name: private-tags\ntask: tag\nconstraints: {external_api_allowed: false}\n"


def cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`visionroute ARGS` in its own process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "visionroute.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )


def own_env(tmp_path: Path) -> dict:
    """A process with its own Prefect home (ephemeral server database) and no configured Prefect server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def prefect_servers(home: Path) -> list[int]:
    """Pids of Prefect API servers (uvicorn) started with this PREFECT_HOME."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if b"prefect.server.api.server:create_app" in command and f"PREFECT_HOME={home}".encode() in environ:
            pids.append(int(entry.name))
    return pids


def runs(client: MlflowClient, experiment: str):
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


# --- one lifecycle -------------------------------------------------------------------------------------------


def test_a_run_whose_owner_is_a_zombie_or_another_process_on_its_pid_counts_as_dead():
    from visionroute.processes import start_time

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while start_time(child.pid) is not None and time.monotonic() < deadline:  # exited, not yet reaped
        time.sleep(0.05)
    tags = {
        "visionroute.host": socket.gethostname(),
        "visionroute.pid": str(child.pid),
        "visionroute.pid_started": "1",
    }
    assert start_time(child.pid) is None and tracking.owner_alive(tags) is False
    child.wait()
    identity = tracking.process_identity()
    assert identity["visionroute.pid_started"] == str(start_time(os.getpid()))
    assert tracking.owner_alive(identity) is True
    assert tracking.owner_alive({**identity, "visionroute.pid_started": "1"}) is False  # the pid, reused


def test_a_failure_while_opening_tracking_leaves_the_parent_run_failed(
    prefect_harness, tmp_path, isolated_state
):
    spec = write_spec(tmp_path / "tags.yaml", PRIVATE_TAGS)
    # The experiment's artifact folder cannot be created: logging the spec to the parent run fails.
    (isolated_state / "artifacts").mkdir(parents=True)
    (isolated_state / "artifacts" / "private-tags").write_text("a file where a folder must go")
    with pytest.raises(OSError):
        route_image_task(str(spec))
    client = tracking.configure()
    [parent] = runs(client, "private-tags")
    assert parent.info.status == "FAILED"
    assert parent.data.tags["visionroute.error"].startswith(("FileExistsError", "NotADirectoryError"))
    assert parent.data.tags["visionroute.pid"] == str(os.getpid())


def test_the_run_lifecycle_marks_failed_on_any_error_and_finished_on_success():
    client = tracking.configure()
    with tracking.run(client, "lifecycle", "ok", {"visionroute.kind": "test"}) as ok:
        pass
    with (
        pytest.raises(KeyboardInterrupt),
        tracking.run(client, "lifecycle", "interrupted", {}) as interrupted,
    ):
        raise KeyboardInterrupt
    assert client.get_run(ok).info.status == "FINISHED"
    stopped = client.get_run(interrupted)
    assert stopped.info.status == "FAILED" and stopped.data.tags["visionroute.error"] == "KeyboardInterrupt"


def test_a_failed_parent_closes_the_child_runs_whose_process_is_gone():
    """A training rank killed while blocked in a collective never closes its run; its parent, failing, does."""
    client = tracking.configure()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    with pytest.raises(RuntimeError), tracking.run(client, "lifecycle", "parent", {}) as parent:
        orphan = tracking.start_run(client, "lifecycle", "rank 0", {}, parent_run_id=parent)
        client.set_tag(orphan, "visionroute.pid", dead.stdout.strip())  # its process is gone
        live = tracking.start_run(client, "lifecycle", "still working", {}, parent_run_id=parent)
        raise RuntimeError("torchrun exited with code 1")
    closed = client.get_run(orphan)
    assert closed.info.status == "FAILED"
    assert closed.data.tags["visionroute.error"] == "RuntimeError: torchrun exited with code 1"
    assert client.get_run(live).info.status == "RUNNING"  # its process lives: its own lifecycle closes it
    assert client.get_run(parent).info.status == "FAILED"


def test_logging_the_model_leaves_the_training_run_open_until_registration_ends():
    # mlflow.start_run(run_id=...) around log_model used to close the run FINISHED before registration.
    import torch

    from visionroute.training.engine import Preprocessing

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2)
    )
    prep = Preprocessing(32, 36, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), ["a", "b"], "tiny")
    client = tracking.check_store()
    with tracking.run(client, "log-model", "finetune-tiny", {}) as run_id:
        uri = model_registry.log_model(run_id, model, prep)
        assert client.get_run(run_id).info.status == "RUNNING"
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    logged = client.get_logged_model(uri.removeprefix("models:/"))
    assert logged.experiment_id == run.info.experiment_id and logged.source_run_id == run_id


# --- stores checked first ------------------------------------------------------------------------------------


def test_an_unreachable_tracking_server_fails_first_naming_the_uri(tmp_path, monkeypatch, capsys):
    spec = write_spec(tmp_path / "tags.yaml", PRIVATE_TAGS)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    started = time.monotonic()
    assert main(["run", str(spec)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the MLflow tracking server http://127.0.0.1:1 does not answer")
    assert "MLFLOW_TRACKING_URI" in err
    print(f"unreachable store reported after {time.monotonic() - started:.2f} s")


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare for a read-only mount")
def test_a_read_only_state_folder_fails_first_naming_the_path(tmp_path):
    state = tmp_path / "ro-state"
    state.mkdir()
    spec = write_spec(tmp_path / "tags.yaml", PRIVATE_TAGS)
    # A real read-only file system (root ignores permission bits): a read-only bind mount in a private namespace.
    script = (
        f"mount --bind -o ro {state} {state} 2>/dev/null || mount --bind {state} {state} && "
        f"mount -o remount,bind,ro {state} && exec {sys.executable} -m visionroute.cli run {spec}"
    )
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("this machine does not allow user namespaces (unshare -rm)")
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "VISIONROUTE_STATE": str(state)},
        cwd=REPO,
    )
    assert done.returncode == 1, done.stderr
    assert (
        f"error: the MLflow store {state / 'mlflow.db'} cannot be written (Read-only file system)"
        in done.stderr
    )
    assert "Traceback" not in done.stderr


def test_two_first_runs_on_a_new_store_migrate_it_once(tmp_path):
    env = {"VISIONROUTE_STATE": str(tmp_path / "fresh")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "visionroute.cli", "repair"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
            cwd=REPO,
        )
        for _ in range(3)
    ]
    outcomes = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], [err[-2000:] for _, err in outcomes]


# --- Prefect start-up ----------------------------------------------------------------------------------------


def test_a_prefect_server_that_does_not_start_in_time_says_how_to_fix_it(tmp_path, monkeypatch):
    from visionroute.prefect_api import startup_timeout

    monkeypatch.delenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", raising=False)
    assert startup_timeout() == 180  # Prefect's own 20 s is missed on a loaded machine
    spec = write_spec(tmp_path / "tags.yaml", PRIVATE_TAGS)
    # One second: a new Python process cannot even import Prefect's server in that time.
    env = own_env(tmp_path) | {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"}
    done = cli("run", str(spec), env=env)
    assert done.returncode == 1, done.stderr
    assert "error: the temporary Prefect server did not start within 1 s" in done.stderr
    assert "export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=600" in done.stderr
    assert "Traceback" not in done.stderr
    assert prefect_servers(tmp_path / "prefect-home") == []


# --- console errors ------------------------------------------------------------------------------------------


def test_an_expected_error_prints_one_clear_line_and_an_unexpected_one_its_traceback(
    prefect_harness, tmp_path
):
    spec = write_spec(tmp_path / "tags.yaml", PRIVATE_TAGS)
    env = {"PREFECT_API_URL": prefect_harness}
    done = cli("run", str(spec), env=env)
    assert done.returncode == 2
    assert "error: " in done.stderr and "set vision_api.input" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout

    artifacts = Path(os.environ["VISIONROUTE_STATE"]) / "artifacts" / "private-tags"
    shutil.rmtree(artifacts)
    artifacts.write_text("a file where a folder must go")  # an OSError: not an error the user caused
    done = cli("run", str(spec), env=env)
    assert done.returncode == 1
    assert "Traceback" in done.stderr


# --- kill -9 and repair --------------------------------------------------------------------------------------

_HALF_REGISTER = """
import sys
from visionroute import model_registry, tracking
client = tracking.check_store()
name, champion, flow_run = sys.argv[1], sys.argv[2] == "champion", sys.argv[3]
tags = {"visionroute.route": "finetune", "prefect.flow_run_id": flow_run or None}
run_id = tracking.start_run(client, name, "finetune-killed", tags)
client.create_registered_model(name) if not client.search_registered_models(f"name = '{name}'") else None
version = client.create_model_version(
    name, f"runs:/{run_id}/model", run_id=run_id,
    tags={model_registry.STATE_TAG: model_registry.REGISTERING},
).version
if champion:  # killed after its last alias, before `ready`
    client.set_model_version_tag(name, version, "promoted", "true")
    client.set_registered_model_alias(name, model_registry.CHAMPION, version)
print(run_id, version)
"""


def half_register(name: str, champion: bool, flow_run: str = "") -> tuple[str, str]:
    """What a process killed during registration leaves: it exits here without closing anything."""
    done = subprocess.run(
        [sys.executable, "-c", _HALF_REGISTER, name, "champion" if champion else "no", flow_run],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    run_id, version = done.stdout.split()
    return run_id, version


def running_flow_run() -> str:
    """A Prefect flow run left Running, as a killed process leaves it."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    @flow(name="killed-flow")
    def killed() -> None: ...

    with get_client(sync_client=True) as client:
        return str(client.create_flow_run(killed, state=Running()).id)


def flow_run_state(flow_run_id: str) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state.type.value


def test_repair_kills_runs_of_dead_processes_and_finishes_or_removes_their_versions(prefect_harness, capsys):
    client = tracking.check_store()
    flow_run = running_flow_run()
    first_run, first = half_register("killed-task", champion=True, flow_run=flow_run)
    second_run, second = half_register("killed-task", champion=False)
    with tracking.run(client, "killed-task", "alive", {}) as alive:  # this process lives: left alone
        assert main(["repair", "killed-task"]) == 0
        assert client.get_run(alive).info.status == "RUNNING"
    for run_id in (first_run, second_run):
        run = client.get_run(run_id)
        assert run.info.status == "KILLED"
        assert "ended without closing this run" in run.data.tags["visionroute.killed"]
    kept = client.get_model_version("killed-task", first)
    assert kept.tags[model_registry.STATE_TAG] == "ready" and kept.tags["promoted"] == "true"
    assert [str(v.version) for v in client.search_model_versions("name = 'killed-task'")] == [first]
    assert second != first
    assert "4 repair(s)" in capsys.readouterr().err
    assert flow_run_state(flow_run) == "CRASHED"


def test_a_half_registered_version_is_refused_by_predict(tmp_path, capsys):
    tracking.check_store()
    _, version = half_register("half-task", champion=False)
    image = make_image(tmp_path / "x.jpg", (200, 40, 40), 1)
    assert main(["predict", "--model", f"models:/half-task/{version}", str(image)]) == 2
    assert "is half-registered (visionroute.state=registering" in capsys.readouterr().err


def torchrun_processes(state: Path, rank: int | None = None) -> list[int]:
    """Pids of torchrun and its ranks started for this state folder (only rank `rank`'s when given)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes() if entry.name.isdigit() else b""
            environ = (entry / "environ").read_bytes() if b"visionroute.training.launch" in command else b""
        except OSError:
            continue
        mine = f"VISIONROUTE_STATE={state}".encode() in environ
        if mine and (rank is None or f"\0RANK={rank}\0".encode() in environ):
            pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_kill_9_mid_ddp_training_then_rerun_resumes_and_leaves_nothing_half_done(tmp_path, isolated_state):
    """`visionroute train --nproc-per-node 2`: the flow plans in its own process and starts torchrun (2 gloo ranks)
    for the training backend. Killing the flow ends the ranks and its Prefect server; the next run repairs what
    it left, resumes from the checkpoint, reports progress and registers once."""
    spec = scratch_task(tmp_path, "killed-mid-training", epochs=4, count=48)
    env = own_env(tmp_path) | {"OMP_NUM_THREADS": "1", "VISIONROUTE_NO_BAR": "1"}
    train = ["train", str(spec), "--nproc-per-node", "2"]

    def start(log: Path) -> subprocess.Popen:
        with log.open("w") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "visionroute.cli", *train],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )

    log = tmp_path / "killed-run.log"
    proc = start(log)

    def checkpointed() -> bool:
        assert proc.poll() is None, f"the run ended before it was killed:\n{log.read_text()[-3000:]}"
        return bool(list((isolated_state / "checkpoints" / "killed-mid-training").glob("*/last.pt")))

    assert wait_for(checkpointed, timeout=480, every=0.1), "no epoch was checkpointed"
    assert len(torchrun_processes(isolated_state)) == 3  # torchrun and its two ranks
    assert prefect_servers(tmp_path / "prefect-home"), "the run's temporary Prefect server was not found"
    proc.send_signal(signal.SIGKILL)  # last.pt is replaced atomically: a complete checkpoint is there
    proc.wait()
    # Each rank watches the flow's process and ends when it is gone; the server's watchdog ends the server.
    assert wait_for(lambda: not torchrun_processes(isolated_state), timeout=30) is not None
    assert wait_for(lambda: not prefect_servers(tmp_path / "prefect-home"), timeout=20) is not None
    client = tracking.configure()
    assert {run.info.status for run in runs(client, "killed-mid-training")} == {"RUNNING"}

    done = cli(*train, env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    assert "training scratch in 2 processes (torchrun, DDP)" in output
    assert "resumed from epoch" in output  # from the killed run's checkpoint
    finished = [r for r in runs(client, "killed-mid-training") if r.info.status == "FINISHED"]
    training = next(r for r in finished if "model" in r.data.params)
    assert training.data.params["processes"] == "2"
    assert int(training.data.tags["visionroute.resumed_from_epoch"]) >= 1
    parent = next(r for r in finished if r.info.run_id != training.info.run_id)
    progress = isolated_state / "runs" / parent.info.run_id / "torchrun" / "progress.jsonl"
    epochs = [json.loads(line)["epoch"] for line in progress.read_text().splitlines()]
    assert epochs == list(range(epochs[0], 5)) and epochs[0] >= 2  # from the epoch after the resumed one
    # What the killed run left is closed: its runs KILLED, no version half-registered, no server, no Running.
    statuses = sorted(run.info.status for run in runs(client, "killed-mid-training"))
    assert statuses == ["FINISHED", "FINISHED", "KILLED", "KILLED"]
    killed = [run for run in runs(client, "killed-mid-training") if run.info.status == "KILLED"]
    assert all("visionroute.killed" in run.data.tags for run in killed)
    versions = client.search_model_versions("name = 'killed-mid-training'")
    assert (
        len(versions) == 1 and versions[0].tags[model_registry.STATE_TAG] == "ready"
    )  # registered by rank 0
    assert not prefect_servers(tmp_path / "prefect-home")
    # The killed flow run and its sub-flow no longer say Running in Prefect's database.
    with sqlite3.connect(tmp_path / "prefect-home" / "prefect.db") as db:
        states = sorted(state for (state,) in db.execute("select state_type from flow_run"))
    assert "RUNNING" not in states and states.count("CRASHED") == 2, states


@pytest.mark.slow
def test_a_rank_that_dies_fails_the_training_with_one_clear_error_and_closes_its_runs(
    tmp_path, isolated_state, monkeypatch
):
    """Rank 1 killed mid-training (as when killed for memory), through the training backend as the route flow
    runs it: torchrun stops rank 0, the error names the exit and carries torchrun's report of the dead rank, the
    training run and its parent close FAILED, no process is left."""
    from visionroute.backends import BackendContext, create_backend

    from visionroute.planning import plan
    from visionroute.training.launch import TrainingProcessesFailed

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec = scratch_task(tmp_path, "rank-dies", epochs=20, count=48)
    spec.write_text(spec.read_text().replace("budget_minutes: 5", "budget_minutes: 5, processes: 2"))
    planned = plan(str(spec), check_images=True)
    client = tracking.configure()
    epochs: list[dict] = []

    def kill_rank_1() -> None:  # once rank 0 has reported an epoch
        rank_1 = wait_for(
            lambda: epochs and torchrun_processes(isolated_state, rank=1), timeout=300, every=0.1
        )
        os.kill(rank_1[0], signal.SIGKILL)

    threading.Thread(target=kill_rank_1, daemon=True).start()
    with (
        pytest.raises(TrainingProcessesFailed) as failed,
        tracking.run(client, "rank-dies", "route", {}) as parent,
    ):
        context = BackendContext(
            planned.spec,
            planned.decision,
            planned.dataset,
            parent,
            isolated_state / "runs" / parent,
            epochs.append,
        )
        create_backend("scratch").run(context)
    message = str(failed.value)
    assert message.startswith("training in 2 processes failed (torchrun exit code 1)")
    assert (
        re.search(r"exitcode\s*:\s*-9", message) and "resumes from the last one" in message
    )  # rank 1's death
    assert wait_for(lambda: not torchrun_processes(isolated_state), timeout=10) is not None
    closed = runs(client, "rank-dies")
    assert len(closed) == 2 and {run.info.status for run in closed} == {"FAILED"}, closed  # none RUNNING
    assert all(run.data.tags[tracking.ERROR_TAG] for run in closed)


@pytest.mark.slow
def test_two_concurrent_first_runs_both_succeed_with_one_champion(tmp_path, prefect_harness):
    spec = scratch_task(tmp_path, "twin-runs", epochs=1, count=90)  # a 30-image test split: a champion
    # The race is in the MLflow store and registry: both runs use the module's Prefect server rather than
    # starting a temporary one each.
    env = own_env(tmp_path) | {"PREFECT_API_URL": prefect_harness}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "visionroute.cli", "run", str(spec)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        for _ in range(2)
    ]
    outcomes = [proc.communicate(timeout=900) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err[-3000:] for _, err in outcomes]
    client = tracking.configure()  # both URIs: an earlier test set the global registry
    versions = client.search_model_versions("name = 'twin-runs'")
    assert len(versions) == 2
    assert sorted(v.tags["promoted"] for v in versions) == ["false", "true"]
    champion = client.get_model_version_by_alias("twin-runs", "champion")
    assert champion.tags["promoted"] == "true"
