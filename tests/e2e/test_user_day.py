"""The user's day in a real browser: `visionroute up`, the Prefect UI's deployment and run form, the MLflow
registry, a promotion through the review-model form, `visionroute down`.

Playwright for Python drives Debian's Chromium (`playwright install` cannot download browsers here). Each step
saves a screenshot under out/e2e/ in the repository (override with VISIONROUTE_E2E_OUT). Tiny data (24 real
ant and bee photos) and a one-epoch budget keep it to a few minutes on two cores.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from conftest import api, free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's; `make install` installs it
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
RUN_TIMEOUT_S = 480

pytestmark = pytest.mark.slow  # it trains (twice, one epoch each); `make test` runs it


def tiny_ants_and_bees(root: Path, train: int = 12, test: int = 15) -> Path:
    """Real photos: `train` per class to train on, and a given test split of `test` per class (15 x 2 is the
    smallest on which a champion can be chosen)."""
    source = REPO / "examples" / "data" / "ants_bees"
    for split, count, folder in (("train", train, "train"), ("test", test, "val")):
        for name in ("ants", "bees"):
            (root / split / name).mkdir(parents=True)
            for photo in sorted((source / folder / name).glob("*.jpg"))[:count]:
                shutil.copy(photo, root / split / name / photo.name)
    return root


def field(scope, label: str):
    """The form property whose own label is `label` (not a nested one's)."""
    return scope.locator(
        "xpath=.//div[contains(@class,'schema-form-property')]"
        "[./div[contains(@class,'p-label__header')]//span[contains(@class,'schema-form-property__label')"
        f" and normalize-space()='{label}']]"
    ).first


OUT = Path(os.environ.get("VISIONROUTE_E2E_OUT", REPO / "out" / "e2e"))


@pytest.fixture
def out_dir() -> Path:
    folder = OUT
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


@pytest.fixture
def services(tmp_path):
    """`visionroute up` on free ports with its own state folder; `visionroute down` whatever happens."""
    state = tmp_path / "state"
    env = {**os.environ, "VISIONROUTE_STATE": str(state)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    ports = free_port(), free_port()
    up = subprocess.run(
        [str(BIN / "visionroute"), "up", "--prefect-port", str(ports[0]), "--mlflow-port", str(ports[1])],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        exports = dict(
            line.removeprefix("export ").split("=", 1)
            for line in up.stdout.splitlines()
            if line.startswith("export ")
        )
        yield {
            "env": {**env, **exports},
            "state": state,
            "prefect": f"http://127.0.0.1:{ports[0]}",
            "mlflow": f"http://127.0.0.1:{ports[1]}",
        }
    finally:
        down = subprocess.run(
            [str(BIN / "visionroute"), "down"], env=env, capture_output=True, text=True, timeout=300
        )
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "down.txt").write_text(down.stderr)  # how long each service took to stop
        for log in (state / "logs").glob("*.log"):  # a service `down` had to kill logged where it hung
            shutil.copy(log, OUT / log.name)
        assert down.returncode == 0, down.stderr[-2000:]
        for port in ports:  # nothing left listening
            with socket.socket() as sock:
                assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open after down"


def wait_for_state(page, url: str, shot: Path, logs: Path) -> str:
    """Reload the flow run's page until the UI shows a final state; returns it."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        page.goto(url)
        page.wait_for_load_state("networkidle")
        text = page.inner_text("body")
        for state in ("Completed", "Failed", "Crashed", "Cancelled"):
            if f"\n{state}\n" in f"\n{text}\n":
                page.screenshot(path=str(shot), full_page=True)
                if state != "Completed":
                    worker = (logs / "worker-cpu.log").read_text(errors="replace")[-4000:]
                    pytest.fail(f"the run ended {state} in the UI; worker log:\n{worker}")
                return state
        time.sleep(5)
    page.screenshot(path=str(shot), full_page=True)
    pytest.fail(f"the run did not finish within {RUN_TIMEOUT_S} s; see {shot}")


class FailedRequests:
    """The browser's failed API requests and console errors, for the report when the UI shows an error."""

    def __init__(self, page):
        self.responses, self.console = [], []
        # Handlers only keep what they see: bodies are read later, outside Playwright's event dispatch.
        page.on("response", lambda response: response.status >= 400 and self.responses.append(response))
        page.on("console", lambda message: message.type == "error" and self.console.append(message.text))

    @property
    def seen(self) -> list[str]:
        lines = []
        for response in self.responses:
            try:
                body = response.text()[:500]
            except Exception as error:  # the body may be gone
                body = f"(body unreadable: {error})"
            lines.append(f"{response.request.method} {response.url} -> {response.status}: {body}")
        return lines + [f"console: {text}" for text in self.console]


def submit_custom_run(page, prefect: str, deployment_id: str, shot: Path, failed: FailedRequests) -> str:
    """Press Submit on the form; once the UI confirms, returns the new flow run's page."""
    confirmed = page.get_by_text("scheduled to start now").first
    oops = page.get_by_text("Oops. Something went wrong.").first
    page.get_by_role("button", name="Submit").click()
    ok = False
    try:
        confirmed.or_(oops).wait_for(timeout=120_000)
        ok = confirmed.is_visible()
        if not ok and oops.is_visible():
            # The UI's generic error toast: seen in 2 of 8 full runs on a loaded 2-core machine, the same form
            # passing before and after. A user presses Submit again; the first failure stays on record.
            page.screenshot(path=str(shot.with_name(f"retry-{shot.name}")), full_page=True)
            # What the UI did not say: the failing request (its status and body) or the console error.
            seen = failed.seen
            shot.with_name(f"retry-{shot.stem}.txt").write_text("\n".join(seen) or "(nothing failed)")
            warnings.warn(
                "the Prefect UI answered 'Something went wrong' to Submit; submitting again. The browser saw:\n"
                + ("\n".join(seen[-10:]) or "no failed request and no console error"),
                stacklevel=1,
            )
            page.get_by_role("button", name="Submit").click()
            confirmed.wait_for(timeout=120_000)
            ok = True
    except Exception:
        pass
    if not ok:
        page.screenshot(path=str(shot), full_page=True)
        pytest.fail(f"the UI did not confirm the submitted run; see {shot}")
    runs = api(
        f"{prefect}/api/flow_runs/filter",
        {"deployments": {"id": {"any_": [deployment_id]}}, "limit": 200},
    )
    manual = [run for run in runs if not run["auto_scheduled"]]
    assert manual, "the UI confirmed a run the API does not list"
    newest = max(manual, key=lambda run: run["created"])
    return f"{prefect}/runs/flow-run/{newest['id']}"


def test_the_users_day_in_a_browser(services, tmp_path, out_dir):
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import expect, sync_playwright

    prefect, mlflow_ui, env = services["prefect"], services["mlflow"], services["env"]
    data = tiny_ants_and_bees(tmp_path / "ants_bees")
    spec = tmp_path / "ants-vs-bees.yaml"
    spec.write_text(
        "name: ants-vs-bees\ntask: classify\ndata: {path: ./ants_bees}\ndomain: natural\n"
        "constraints: {monthly_volume: 50000}\ntraining: {model: tf_efficientnet_lite0, budget_minutes: 1, epochs: 1}\n"
    )
    assert data.exists()
    # Yesterday's champion, trained from the command line against the same servers (the `export` lines).
    seeded = subprocess.run(
        [str(BIN / "visionroute"), "run", str(spec)], env=env, capture_output=True, text=True, timeout=600
    )
    assert seeded.returncode == 0, seeded.stderr[-3000:]
    assert "registered model: models:/ants-vs-bees/1" in seeded.stdout
    deployments = {d["name"]: d["id"] for d in api(f"{prefect}/api/deployments/filter", {})}

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        failed = FailedRequests(page)

        # 1. The ants-vs-bees deployment shows its weekly schedule.
        page.goto(f"{prefect}/deployments/deployment/{deployments['ants-vs-bees-weekly']}")
        schedule = page.get_by_text("At 06:00 AM, only on Monday")
        schedule.first.wait_for()
        page.screenshot(path=str(out_dir / "01-deployment-schedule.png"), full_page=True)

        # 2. A custom run from the form: this spec, a shorter budget (the form explains every field).
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Custom run", exact=True).click()
        page.wait_for_url("**/run?**")
        spec_field = field(page, "spec_path (Optional)")
        # expect() waits: the descriptions render after the labels.
        expect(spec_field).to_contain_text("An existing task spec file on the worker")
        spec_field.locator("textarea").fill(str(spec))
        overrides = field(page, "overrides (Optional)")
        field(overrides, "Budget Minutes (Optional)").locator("input").fill("0.5")
        field(overrides, "Epochs (Optional)").locator("input").fill("1")
        expect(overrides).to_contain_text("Force a route for this run")
        page.screenshot(path=str(out_dir / "02-custom-run-form.png"), full_page=True)
        run_url = submit_custom_run(
            page, prefect, deployments["ants-vs-bees-weekly"], out_dir / "02b-submit-failed.png", failed
        )

        # 3. The UI shows it Completed; the run itself carries the progress bar and the MLflow links.
        wait_for_state(page, run_url, out_dir / "03-run-completed.png", services["state"] / "logs")
        run_id = run_url.rsplit("/", 1)[-1]
        run = api(f"{prefect}/api/flow_runs/{run_id}")
        assert run["parameters"]["overrides"]["budget_minutes"] == 0.5
        artifacts = api(f"{prefect}/api/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
        kinds = {(a["key"], a["type"]) for a in artifacts}
        assert ("ants-vs-bees-progress", "progress") in kinds
        links = {a["key"]: a["data"] for a in artifacts}
        assert f"({mlflow_ui}/#/models/ants-vs-bees/versions/2)" in links["ants-vs-bees-model-version"]
        assert f"({mlflow_ui}/#/experiments/" in links["ants-vs-bees-mlflow-run"]
        progress = [a for a in artifacts if a["type"] == "progress"][0]
        assert progress["data"] == 100.0
        page.get_by_text("Artifacts", exact=True).first.click()
        page.wait_for_load_state("networkidle")
        page.screenshot(path=str(out_dir / "04-run-artifacts.png"), full_page=True)
        link = next(a for a in artifacts if a["key"] == "ants-vs-bees-model-version")
        page.goto(f"{prefect}/artifacts/artifact/{link['id']}")
        page.get_by_text("ants-vs-bees version 2").first.wait_for()
        page.screenshot(path=str(out_dir / "04b-link-to-mlflow-version.png"), full_page=True)

        # 4. The MLflow UI: version 2 with an alias and its description.
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        aliases = client.get_model_version("ants-vs-bees", "2").aliases
        assert {"challenger"} <= set(aliases)
        page.goto(f"{mlflow_ui}/#/models/ants-vs-bees")
        page.get_by_text("Version 2").first.wait_for()
        expect(page.locator("body")).to_contain_text("challenger")
        page.screenshot(path=str(out_dir / "05-mlflow-model.png"), full_page=True)
        page.goto(f"{mlflow_ui}/#/models/ants-vs-bees/versions/2")
        page.get_by_text("on the same test split").first.wait_for()
        expect(page.locator("body")).to_contain_text("by rule")
        page.screenshot(path=str(out_dir / "06-mlflow-version.png"), full_page=True)

        # 5. review-model from its form: make the version that is not champion the champion, with a reason.
        champion = str(client.get_model_version_by_alias("ants-vs-bees", "champion").version)
        target = "1" if champion == "2" else "2"
        page.goto(f"{prefect}/deployments/deployment/{deployments['review-model']}/run")
        field(page, "reviewer (Optional)").wait_for()
        field(page, "version (Optional)").locator("textarea, input").first.fill(target)
        field(page, "reviewer (Optional)").locator("textarea, input").first.fill("Ada Reviewer")
        field(page, "reason (Optional)").locator("textarea, input").first.fill("checked the confusion matrix")
        page.screenshot(path=str(out_dir / "07-review-form.png"), full_page=True)
        review_url = submit_custom_run(
            page, prefect, deployments["review-model"], out_dir / "07b-submit-failed.png", failed
        )
        wait_for_state(page, review_url, out_dir / "08-review-completed.png", services["state"] / "logs")

        # 6. The alias history shows the change, with who and why, in the registry and in the MLflow UI.
        assert str(client.get_model_version_by_alias("ants-vs-bees", "champion").version) == target
        history = json.loads(client.get_registered_model("ants-vs-bees").tags["visionroute.alias_history"])
        assert (history[-1]["version"], history[-1]["previous"], history[-1]["reviewer"]) == (
            target,
            champion,
            "Ada Reviewer",
        )
        page.goto(f"{mlflow_ui}/#/models/ants-vs-bees")
        page.get_by_text("Ada Reviewer").first.wait_for()
        expect(page.locator("body")).to_contain_text("checked the confusion matrix")
        page.screenshot(path=str(out_dir / "09-mlflow-history.png"), full_page=True)
        browser.close()
    assert len([shot for shot in out_dir.glob("*.png") if not shot.name.startswith("retry-")]) == 10
