"""Against a real `prefect server`: the CLI's flow run lands on it, and the deployment file deploys."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, api, free_port, make_dataset, write_spec

pytestmark = pytest.mark.flow
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",  # where the UI in the browser finds the API
    }
    process = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
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


@pytest.mark.slow
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
    for pool in ("cpu", "gpu"):
        subprocess.run(
            [prefect, "work-pool", "create", pool, "--type", "process", "--overwrite"],
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
    assert weekly["work_pool_name"] == "cpu"
    # No state folder baked in: workers take VISIONROUTE_STATE and MLFLOW_TRACKING_URI from their environment.
    assert "VISIONROUTE_STATE" not in weekly["job_variables"].get("env", {})
    assert "route-any-task" in deployments


SHARED_QUOTA_WORKER = """
import sys, time
from pathlib import Path
from visionroute.decision.costs import load_prices
from visionroute.spec import load_spec
from visionroute.vision.service import annotate, input_paths

spec = load_spec(sys.argv[1])
paths, _ = input_paths(spec)
Path(sys.argv[2]).touch()  # imported and ready
while not Path(sys.argv[3]).exists():
    time.sleep(0.05)
result = annotate(spec, "aws", paths, load_prices(), progress_bar=False)
print(result.stats.answered, result.stats.throttled_responses)
"""


def test_two_processes_share_one_quota_through_prefect(server, tmp_path):
    """Two processes calling one API at 300 requests/min each would send 10/s together; with a Prefect server
    configured they share one global rate limit, so the API sees its quota and never throttles."""
    from conftest import COLOURS, make_image
    from fakes.aws_fake import RekognitionFake
    from fakes.behaviour import FakeBehaviour

    # The server allows 6/s: one second of slack over the declared 5/s for network jitter, half of what two
    # unshared processes would send.
    behaviour = FakeBehaviour(max_batch=1, requests_per_s=6, latency_s=0.02)
    with RekognitionFake(behaviour) as fake:
        workers, ready = [], []
        for index in range(2):
            folder = tmp_path / f"photos{index}"
            for n in range(20):
                make_image(folder / f"p{n}.jpg", list(COLOURS.values())[n % 3], seed=1000 * index + n)
            spec = write_spec(
                tmp_path / f"tagging{index}.yaml",
                f"name: shared-quota\ntask: tag\ndata: {{path: {folder}}}\n"
                f"vision_api: {{provider: aws, endpoint: '{fake.endpoint}', requests_per_minute: 300, cache: false}}\n",
            )
            ready.append(tmp_path / f"ready{index}")
            env = {
                **server,
                "VISIONROUTE_STATE": str(tmp_path / "state"),
                "AWS_ACCESS_KEY_ID": "AKIASHAREDQUOTA",
                "AWS_SECRET_ACCESS_KEY": "not-a-real-secret",
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true",
            }
            workers.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        SHARED_QUOTA_WORKER,
                        str(spec),
                        str(ready[-1]),
                        str(tmp_path / "go"),
                    ],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        deadline = time.monotonic() + 120
        while not all(path.exists() for path in ready):
            assert all(w.poll() is None for w in workers), [w.communicate()[1][-2000:] for w in workers]
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.1)
        (tmp_path / "go").touch()
        outputs = [w.communicate(timeout=120) for w in workers]
    for worker, (out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err[-3000:]
        assert out.split() == ["20", "0"]  # every image answered, no 429
    assert behaviour.throttled == 0
    arrivals = sorted(behaviour.arrivals)
    in_first_two_seconds = sum(1 for t in arrivals if t - arrivals[0] < 2.0)
    assert in_first_two_seconds <= 3 + 2 * 5 + 1  # the burst, two seconds of decay, one in flight
    limits = {
        item["name"]: item for item in api(f"{server['PREFECT_API_URL']}/v2/concurrency_limits/filter", {})
    }
    shared = [item for name, item in limits.items() if name.startswith("visionroute-aws")]
    assert shared and shared[0]["slot_decay_per_second"] == 5.0 and shared[0]["limit"] == 3


def page_text(url: str, profile: Path) -> str:
    """What a person sees at `url`: headless Chromium runs the Prefect UI's JavaScript, then its DOM as text."""
    chromium = shutil.which("chromium")
    assert chromium, "Chromium is missing: `make install` installs Debian's chromium for this test"
    done = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=15000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return " ".join(re.sub(r"<[^>]+>", " ", html.unescape(done.stdout)).split())


def test_the_prefect_ui_shows_the_vision_route_in_a_browser(server, tmp_path):
    """The README's UI claims, read the way a person reads them: the decision as markdown, the per-route
    costs, the result table and a finished progress bar, each on its artifact page in the Prefect UI."""
    from conftest import COLOURS, make_image

    for index in range(4):
        make_image(tmp_path / "photos" / f"p{index}.jpg", list(COLOURS.values())[index % 3], seed=index)
    spec = write_spec(
        tmp_path / "ui.yaml",
        "name: ui-tagging\ntask: tag\nconstraints: {external_api_allowed: false}\nvision_api: {input: ./photos}\n",
    )
    env = {**server, "VISIONROUTE_STATE": str(tmp_path / "state")}
    done = subprocess.run(
        [str(BIN / "visionroute"), "run", str(spec)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    base = server["PREFECT_API_URL"].removesuffix("/api")
    artifacts = {a["key"]: a["id"] for a in api(f"{server['PREFECT_API_URL']}/artifacts/filter", {})}

    decision = page_text(f"{base}/artifacts/artifact/{artifacts['ui-tagging-decision']}", tmp_path / "c1")
    assert "ui-tagging: route vision_api (provider local )" in decision  # code spans keep their gap
    assert "generic-private-local" in decision and "images must not leave the premises" in decision
    costs = page_text(f"{base}/artifacts/artifact/{artifacts['ui-tagging-route-costs']}", tmp_path / "c2")
    assert all(route in costs for route in ("vision_api", "finetune", "scratch"))
    result = page_text(f"{base}/artifacts/artifact/{artifacts['ui-tagging-result']}", tmp_path / "c3")
    assert "4 of 4 image(s) answered" in result and "billed_units" in result and "latency_p95_s" in result
    progress = page_text(f"{base}/artifacts/artifact/{artifacts['ui-tagging-progress']}", tmp_path / "c4")
    assert "Progress: 100%" in progress
