"""Shared fixtures: isolated state per test, no network, and small real image datasets made on the fly."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"


@pytest.fixture(autouse=True)
def isolated_state(tmp_path, monkeypatch):
    """Each test gets its own MLflow store and checkpoints folder; no user or CI state leaks in."""
    monkeypatch.setenv("VISIONROUTE_STATE", str(tmp_path / "state"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("VISIONROUTE_PRICES", raising=False)
    monkeypatch.delenv("VISIONROUTE_ALLOW_HUB", raising=False)
    monkeypatch.delenv("VISIONROUTE_CPU_BF16", raising=False)
    engine = sys.modules.get("visionroute.training.engine")
    if engine is not None:  # the CPU's precision is decided afresh from this test's environment
        engine.cpu_bf16.cache_clear()
    return tmp_path / "state"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection outside loopback fails the test: nothing may download weights or data."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and not (
            host.startswith("127.") or host in ("localhost", "::1") or "/" in host
        ):
            raise AssertionError(f"test tried to reach the network: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


def free_port() -> int:
    """A TCP port nothing listens on right now (for servers a test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, every: float = 0.5):
    """`predicate()`'s first truthy value within `timeout` seconds, else None."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    return None


def api(url: str, body: dict | None = None):
    """GET (or POST `body` as JSON to) a local server's JSON API."""
    import json
    import urllib.request

    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=20) as response:
        return json.loads(response.read())


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's test harness (a temporary server and database), started once for every flow-test module that
    asks for it: each start costs 10-30 s on 2 cores. Returns its API URL, for CLI runs in their own process."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        from prefect.settings import PREFECT_API_URL

        yield PREFECT_API_URL.value()


def prefect_artifact(key: str):
    """The Prefect artifacts with this key, newest first, read from the server the test talks to."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                sort=ArtifactSort.CREATED_DESC,
            )

    return asyncio.run(read())


COLOURS = {"red": (200, 40, 40), "blue": (40, 60, 200), "green": (40, 170, 60)}


def make_image(path: Path, colour: tuple[int, int, int], seed: int, size=(96, 72), fmt="JPEG") -> Path:
    """A colour field with noise and random light and dark blocks: trivially separable by colour, each image
    with its own structure (so no two are near-duplicates), and real JPEG/PNG files."""
    rng = np.random.default_rng(seed)
    array = np.clip(np.array(colour) + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255)
    for _ in range(8):
        w, h = rng.integers(size[0] // 8, size[0] // 2), rng.integers(size[1] // 8, size[1] // 2)
        x, y = rng.integers(0, size[0] - w), rng.integers(0, size[1] - h)
        array[y : y + h, x : x + w] *= rng.uniform(0.3, 1.6)
    array = np.clip(array, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, fmt)
    return path


def image_input(path: Path):
    """An ImageInput as the Vision API runner builds it: the file's bytes, their sha256, PIL's size and format."""
    import hashlib

    from visionroute.vision.base import ImageInput

    data = path.read_bytes()
    with Image.open(path) as image:
        width, height = image.size
        fmt = image.format
    return ImageInput(str(path), hashlib.sha256(data).hexdigest(), data, width, height, fmt)


def make_dataset(
    root: Path, per_class: int = 10, classes=("red", "blue"), splits: tuple[str, ...] = ()
) -> Path:
    """Class folders of synthetic photos; with `splits`, under train/ val/ ... each with `per_class` images."""
    seed = 0
    for split in splits or (None,):
        base = root / split if split else root
        for name in classes:
            for index in range(per_class):
                seed += 1
                make_image(base / name / f"{name}_{index}.jpg", COLOURS[name], seed)
    return root


def grey_npz(path, count=60, side=28, seed=0):
    """A MedMNIST-layout .npz: bright blob (class 1) or not, with official train/val/test splits."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", count), ("val", count // 3), ("test", count // 3)):
        labels = np.arange(n) % 2
        images = rng.integers(0, 80, (n, side, side)).astype(np.uint8)
        for index in np.flatnonzero(labels == 1):  # a blob at its own place: no two images near-duplicates
            top, left = rng.integers(0, side - 12, 2)
            images[index, top : top + 10, left : left + 10] += 150
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None]
    np.savez(path, **arrays)
    return path


SCRATCH_SPEC = """
name: {name}
task: classify
data: {{path: ./returns.npz}}
domain: radar
route: scratch
constraints: {{external_api_allowed: false}}
training: {{epochs: {epochs}, budget_minutes: 5}}
"""


def scratch_task(root: Path, name: str, epochs: int, count: int) -> Path:
    """A far-domain task over grey 28 px images (official splits, count // 3 test images): trains in seconds."""
    grey_npz(root / "returns.npz", count=count)
    return write_spec(root / f"{name}.yaml", SCRATCH_SPEC.format(name=name, epochs=epochs))


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    return make_dataset(tmp_path / "data", per_class=12)


def write_spec(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def bench_module(name: str):
    """A script from bench/ as a module: tests use the calibration's own planting code and digit set."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shared_dataset(name: str) -> Path:
    path = SHARED / name
    if not path.exists():
        pytest.skip(
            f"shared dataset {name} not found at {path} (only developer and CI machines have ../shared)"
        )
    return path


# The access key id is an identifier, not a secret: SigV4 sends it in every request's Authorization header
# (and botocore's DEBUG log prints that header). The secret key and the Azure key are never sent or logged.
ACCESS_KEY_ID = "AKIAVISIONROUTETEST1"
SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "aws-secret-DO-NOT-LOG-0123456789abcdef",
    "VISION_KEY": "azure-key-DO-NOT-LOG-fedcba9876543210",
}


@pytest.fixture
def cloud_credentials(monkeypatch, tmp_path) -> dict:
    """Fake credentials for the AWS and Azure SDKs (the local fakes accept them); the developer's own
    credential files and instance metadata never leak in. Returns the secret values, to search logs for."""
    for name in (
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_ROLE_ARN",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "GOOGLE_APPLICATION_CREDENTIALS",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "no-gcloud"))
    return dict(SECRETS)
