"""Against a real `prefect server`: the CLI's flow run lands on it, and the deployment file deploys."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, make_dataset, write_spec

pytestmark = pytest.mark.flow
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def api(url: str, body: dict | None = None):
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
    }
    process = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 90
    while True:
        try:
            api(f"http://127.0.0.1:{port}/api/health")
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail("prefect server did not start within 90 s")
            time.sleep(0.5)
    yield env
    process.terminate()
    process.wait(timeout=30)


def test_cli_run_lands_on_a_running_server(server, tmp_path):
    make_dataset(tmp_path / "data", per_class=8)
    spec = write_spec(
        tmp_path / "colours.yaml",
        "name: colours-server\ntask: classify\ndata: {path: ./data}\n"
        "training: {model: tf_efficientnet_lite0, epochs: 1, budget_minutes: 2}\n",
    )
    env = {**server, "VISIONROUTE_STATE": str(tmp_path / "state")}
    done = subprocess.run(
        [str(BIN / "visionroute"), "run", str(spec)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "registered model: models:/colours-server/1" in done.stdout
    runs = api(f"{server['PREFECT_API_URL']}/flow_runs/filter", {})
    states = {(run["name"], run["state_type"]) for run in runs}
    assert ("finetune", "COMPLETED") in states  # the backend sub-flow
    flows = {flow["id"]: flow["name"] for flow in api(f"{server['PREFECT_API_URL']}/flows/filter", {})}
    assert {"route-image-task", "run-backend"} <= set(flows.values())


def test_deployment_file_deploys_with_its_schedule(server):
    env = {**server, "PWD": str(REPO)}
    prefect = str(BIN / "prefect")
    subprocess.run(
        [prefect, "work-pool", "create", "visionroute-local", "--type", "process"],
        env=env,
        check=True,
        capture_output=True,
        cwd=REPO,
    )
    done = subprocess.run(
        [prefect, "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--all"],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    deployments = {d["name"]: d for d in api(f"{server['PREFECT_API_URL']}/deployments/filter", {})}
    weekly = deployments["ants-vs-bees-weekly"]
    assert weekly["entrypoint"] == "flows/route.py:route_image_task"
    assert weekly["parameters"] == {"spec_path": "examples/tasks/ants-vs-bees.yaml"}
    assert weekly["schedules"][0]["schedule"]["cron"] == "0 6 * * 1"
    assert weekly["job_variables"]["env"]["VISIONROUTE_STATE"] == f"{REPO}/.state"
    assert "route-any-task" in deployments
