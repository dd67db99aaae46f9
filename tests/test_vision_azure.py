"""The azure provider through the real azure-ai-vision-imageanalysis SDK, over HTTP, against the local fake."""

from __future__ import annotations

import logging
import time

import pytest
from conftest import COLOURS, image_input, make_image
from fakes.azure_fake import AzureVisionFake
from fakes.behaviour import FakeBehaviour

from visionroute.vision.azure import AzureVisionProvider, create_azure_provider
from visionroute.vision.base import (
    ApiError,
    ErrorKind,
    ImageError,
    ImageInput,
    Provider,
    ProviderConfigError,
    ProviderSettings,
    create_provider,
)

KEY = "s3cr3t-azure-key-0123456789abcdef"
CENTRE = [0.25, 0.25, 0.5, 0.5]


@pytest.fixture
def behaviour() -> FakeBehaviour:
    return FakeBehaviour(max_batch=1, hang_s=1.0)


@pytest.fixture
def fake(behaviour):
    with AzureVisionFake(behaviour, key=KEY) as server:
        yield server


@pytest.fixture
def env(fake, monkeypatch):
    monkeypatch.setenv("VISION_ENDPOINT", fake.endpoint)
    monkeypatch.setenv("VISION_KEY", KEY)
    return fake


@pytest.fixture
def provider(env):
    with create_azure_provider(ProviderSettings(timeout_s=5.0)) as built:
        yield built


@pytest.fixture
def red(tmp_path) -> ImageInput:
    return image_input(make_image(tmp_path / "red.jpg", COLOURS["red"], seed=1))


def assert_no_key(*objects: object) -> None:
    for item in objects:
        assert KEY not in str(item)
        assert KEY not in repr(item)
        if hasattr(item, "__dict__"):
            assert KEY not in str(vars(item))


# ---- construction and conformance ---------------------------------------------------------------------
def test_registered_and_conforms(env):
    provider = create_provider("azure", ProviderSettings())
    assert isinstance(provider, AzureVisionProvider)
    assert isinstance(provider, Provider)
    assert provider.features() == frozenset({"tag", "ocr", "detect_objects"})
    assert "detect_faces" not in provider.features()
    assert provider.max_batch == 1
    assert provider.max_image_bytes == 20 * 1024 * 1024
    assert provider.api_version == "2023-10-01"
    assert {"JPEG", "PNG", "WEBP", "TIFF"} <= provider.formats
    assert provider.default_quota.requests_per_s == 10.0
    assert_no_key(provider)


@pytest.mark.parametrize("missing", ["VISION_ENDPOINT", "VISION_KEY"])
def test_missing_configuration_names_the_variable(monkeypatch, missing):
    monkeypatch.setenv("VISION_ENDPOINT", "https://example.cognitiveservices.azure.com")
    monkeypatch.setenv("VISION_KEY", KEY)
    monkeypatch.delenv(missing)
    with pytest.raises(ProviderConfigError, match=missing) as caught:
        create_azure_provider(ProviderSettings())
    assert KEY not in str(caught.value)


def test_settings_endpoint_wins_over_environment(fake, monkeypatch, red):
    monkeypatch.setenv("VISION_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("VISION_KEY", KEY)
    with create_azure_provider(ProviderSettings(endpoint=fake.endpoint + "/")) as provider:
        assert provider.annotate([red], "tag")[0].labels[0]["name"] == "Red"


# ---- answers --------------------------------------------------------------------------------------------
def test_tags_normalised(provider, env, red):
    [annotation] = provider.annotate([red], "tag")
    assert annotation.labels == [{"name": "Red", "score": 0.9}, {"name": "Image", "score": 0.5}]
    assert annotation.text == annotation.objects == annotation.faces == []
    [path] = env.paths
    assert path.startswith("/computervision/imageanalysis:analyze?")
    assert "features=tags" in path and "api-version=2023-10-01" in path
    headers = {name.lower(): value for name, value in env.behaviour.headers_seen[0].items()}
    assert headers["content-type"] == "application/octet-stream"


def test_ocr_lines_with_boxes(provider, tmp_path):
    image = image_input(make_image(tmp_path / "blue.png", COLOURS["blue"], seed=2, size=(80, 64), fmt="PNG"))
    [annotation] = provider.annotate([image], "ocr")
    assert annotation.text == [{"text": f"TEXT {image.sha256[:8]}", "box": CENTRE, "score": 0.99}]


def test_objects_normalised(provider, tmp_path):
    image = image_input(make_image(tmp_path / "green.jpg", COLOURS["green"], seed=3))
    [annotation] = provider.annotate([image], "detect_objects")
    [found] = annotation.objects
    assert found == {"name": "Green", "score": 0.8, "box": CENTRE}
    assert all(0.0 <= value <= 1.0 for value in found["box"])


def test_faces_and_batches_refused(provider, red):
    with pytest.raises(ApiError) as caught:
        provider.annotate([red], "detect_faces")
    assert caught.value.kind == ErrorKind.UNSUPPORTED_FEATURE and not caught.value.retryable
    with pytest.raises(ValueError):
        provider.annotate([red, red], "tag")
    assert provider.annotate([], "tag") == []


def test_concurrent_requests(provider, env, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    env.behaviour.latency_s = 0.2
    images = [image_input(make_image(tmp_path / f"{i}.jpg", COLOURS["blue"], seed=10 + i)) for i in range(8)]
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda image: provider.annotate([image], "tag")[0], images))
    assert time.monotonic() - started < 1.2  # served in parallel, not 8 x 0.2 s
    assert [answer.labels[0]["name"] for answer in answers] == ["Blue"] * 8


# ---- errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "failure, kind, status, retryable",
    [
        ("throttled", ErrorKind.THROTTLED, 429, True),
        ("unavailable", ErrorKind.UNAVAILABLE, 503, True),
        ("server_error", ErrorKind.SERVER, 500, True),
        ("bad_request", ErrorKind.BAD_REQUEST, 400, False),
        ("unauthorized", ErrorKind.UNAUTHORIZED, 401, False),
        ("forbidden", ErrorKind.FORBIDDEN, 403, False),
    ],
)
def test_request_failures_map_to_kinds(provider, env, red, failure, kind, status, retryable):
    env.behaviour.fail_next(1, failure)
    with pytest.raises(ApiError) as caught:
        provider.annotate([red], "tag")
    error = caught.value
    assert (error.kind, error.status, error.retryable) == (kind, status, retryable)
    assert error.retry_after == (1.0 if failure == "throttled" else None)
    assert env.http_requests == 1  # the SDK's own RetryPolicy is off: our runner decides
    assert_no_key(error)
    assert error.__cause__ is None and error.__context__ is None  # nothing chains the request's headers
    # The next request is answered normally.
    assert provider.annotate([red], "tag")[0].labels[0]["name"] == "Red"


def test_retry_after_reaches_api_error(provider, env, red):
    env.behaviour.fail_next(1, "throttled", retry_after=7)
    started = time.monotonic()
    with pytest.raises(ApiError) as caught:
        provider.annotate([red], "tag")
    assert caught.value.kind == ErrorKind.THROTTLED and caught.value.retry_after == 7.0
    assert time.monotonic() - started < 2  # the SDK did not sleep the Retry-After out itself
    assert env.http_requests == 1


def test_server_quota_throttles(env, monkeypatch, red):
    env.behaviour = FakeBehaviour(max_batch=1, requests_per_s=1.0)
    with create_azure_provider(ProviderSettings()) as provider:
        provider.annotate([red], "tag")
        with pytest.raises(ApiError) as caught:
            provider.annotate([red], "tag")
    assert caught.value.kind == ErrorKind.THROTTLED and caught.value.retry_after == 1.0


def test_one_request_under_scripted_503s(provider, env, red):
    env.behaviour.fail_next(3, "unavailable")
    for expected in (1, 2, 3):
        with pytest.raises(ApiError) as caught:
            provider.annotate([red], "ocr")
        assert caught.value.kind == ErrorKind.UNAVAILABLE
        assert env.http_requests == expected
    assert env.behaviour.failures_sent == {"unavailable": 3}


def test_client_timeout(env, red):
    env.behaviour.fail_next(1, "timeout")  # hangs 1.0 s, then answers
    with create_azure_provider(ProviderSettings(timeout_s=0.3)) as provider:
        started = time.monotonic()
        with pytest.raises(ApiError) as caught:
            provider.annotate([red], "tag")
        assert time.monotonic() - started < 0.9
    assert caught.value.kind == ErrorKind.TIMEOUT and caught.value.retryable
    assert env.http_requests == 1
    assert_no_key(caught.value)


def test_connection_refused_is_unavailable(env, monkeypatch, red):
    endpoint = env.endpoint
    env.stop()
    monkeypatch.setenv("VISION_ENDPOINT", endpoint)
    with (
        create_azure_provider(ProviderSettings(timeout_s=2.0)) as provider,
        pytest.raises(ApiError) as caught,
    ):
        provider.annotate([red], "tag")
    assert caught.value.kind == ErrorKind.UNAVAILABLE and caught.value.retryable
    assert_no_key(caught.value)


def test_wrong_key_is_unauthorized(env, monkeypatch, red):
    monkeypatch.setenv("VISION_KEY", "not-the-key")
    with create_azure_provider(ProviderSettings()) as provider, pytest.raises(ApiError) as caught:
        provider.annotate([red], "tag")
    assert caught.value.kind == ErrorKind.UNAUTHORIZED and caught.value.status == 401
    assert "not-the-key" not in str(caught.value)
    assert env.behaviour.requests == 0  # rejected before it reached the quota


@pytest.mark.parametrize("nested", [True, False])
def test_image_failures_come_back_per_image(behaviour, monkeypatch, red, nested):
    with AzureVisionFake(behaviour, key=KEY, nested_errors=nested) as server:
        monkeypatch.setenv("VISION_ENDPOINT", server.endpoint)
        monkeypatch.setenv("VISION_KEY", KEY)
        with create_azure_provider(ProviderSettings()) as provider:
            behaviour.fail_image(red.sha256, "invalid_image", times=1)
            [result] = provider.annotate([red], "tag")
            assert isinstance(result, ImageError) and result.kind == ErrorKind.INVALID_IMAGE
            assert "InvalidImageFormat" in result.message and not result.retryable

            behaviour.max_image_bytes = 10  # the fake's size limit: InvalidImageSize
            [result] = provider.annotate([red], "tag")
            assert isinstance(result, ImageError) and result.kind == ErrorKind.TOO_LARGE
            behaviour.max_image_bytes = None

            # Bytes PIL cannot decode: the fake answers as the service would.
            broken = ImageInput("broken.jpg", "0" * 64, b"not an image", 10, 10, "JPEG")
            [result] = provider.annotate([broken], "tag")
            assert isinstance(result, ImageError) and result.kind == ErrorKind.INVALID_IMAGE


def test_key_header_sent_and_never_shown(provider, env, red, caplog):
    caplog.set_level(logging.DEBUG)  # azure-core's HttpLoggingPolicy logs request headers at INFO
    provider.annotate([red], "tag")
    env.behaviour.fail_next(1, "unauthorized")
    with pytest.raises(ApiError):
        provider.annotate([red], "tag")
    assert "Ocp-Apim-Subscription-Key" in caplog.text and KEY not in caplog.text  # logged, redacted
    headers = {name.lower(): value for name, value in env.behaviour.headers_seen[0].items()}
    assert headers["ocp-apim-subscription-key"] == KEY
    assert_no_key(provider, provider.__dict__)
