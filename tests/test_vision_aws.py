"""The `aws` (Rekognition) provider through the real boto3 over the real wire: against RekognitionFake for
answers and failures, against moto's server for the S3 object option and moto's own DetectLabels."""

from __future__ import annotations

import socket
import threading
import time
import uuid

import boto3
import pytest
from conftest import COLOURS, image_input, make_image
from fakes.aws_fake import RekognitionFake
from fakes.behaviour import FakeBehaviour

from visionroute.vision.aws import RekognitionProvider, create_aws_provider
from visionroute.vision.base import (
    ApiError,
    ErrorKind,
    ImageError,
    ImageInput,
    Provider,
    ProviderConfigError,
    ProviderSettings,
    create_provider,
    list_providers,
)

ACCESS_KEY = "AKIAFAKEVISIONROUTE1"
SECRET_KEY = "fake/Secret+Key0123456789abcdefghijKLMNOP"
CENTRE = [0.25, 0.25, 0.5, 0.5]

CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
)


@pytest.fixture(autouse=True)
def aws_env(tmp_path, monkeypatch):
    """Fake credentials only; the developer's own AWS files and instance metadata never leak in."""
    for name in CREDENTIAL_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)


@pytest.fixture
def image(tmp_path) -> ImageInput:
    return image_input(make_image(tmp_path / "red.jpg", COLOURS["red"], seed=1))


@pytest.fixture
def fake():
    with RekognitionFake(FakeBehaviour(max_batch=1, hang_s=1.0)) as server:
        yield server


@pytest.fixture
def provider(fake) -> RekognitionProvider:
    return create_provider("aws", ProviderSettings(endpoint=fake.endpoint, timeout_s=5.0))


# ---- the protocol --------------------------------------------------------------------------------------------
def test_provider_conforms_and_is_registered(provider):
    assert "aws" in list_providers()
    assert isinstance(provider, Provider)
    assert isinstance(provider, RekognitionProvider)
    assert provider.name == "aws" and provider.api_version == "2016-06-27"
    assert provider.max_batch == 1
    assert provider.max_image_bytes == 5 * 1024 * 1024
    assert provider.formats == frozenset({"JPEG", "PNG"})
    assert provider.default_quota.requests_per_s == 10.0
    assert provider.features() == frozenset({"tag", "ocr", "detect_objects", "detect_faces"})
    assert provider.region == "us-east-1"


def test_botocore_retries_are_off(provider):
    config = provider._client.meta.config
    assert config.retries["total_max_attempts"] == 1
    assert config.max_pool_connections == 64
    assert config.read_timeout == 5.0


# ---- the four features, normalised ---------------------------------------------------------------------------
@pytest.mark.parametrize(("colour", "fmt"), [("red", "JPEG"), ("green", "PNG"), ("blue", "JPEG")])
def test_tag_labels_best_first_scores_as_fractions(tmp_path, fake, provider, colour, fmt):
    path = make_image(tmp_path / f"{colour}.img", COLOURS[colour], seed=3, fmt=fmt)
    [annotation] = provider.annotate([image_input(path)], "tag")
    assert annotation.labels == [{"name": colour.capitalize(), "score": 0.9}, {"name": "Image", "score": 0.5}]
    assert fake.targets == ["RekognitionService.DetectLabels"]


def test_detect_objects_uses_label_instances(fake, provider, image):
    [annotation] = provider.annotate([image], "detect_objects")
    assert annotation.objects == [{"name": "Red", "score": 0.8, "box": CENTRE}]
    assert annotation.labels == []
    assert fake.targets == ["RekognitionService.DetectLabels"]


def test_ocr_keeps_lines_not_words(fake, provider, image):
    [annotation] = provider.annotate([image], "ocr")
    assert annotation.text == [{"text": f"TEXT {image.sha256[:8]}", "box": CENTRE, "score": 0.99}]
    assert fake.targets == ["RekognitionService.DetectText"]


def test_detect_faces(fake, provider, image):
    [annotation] = provider.annotate([image], "detect_faces")
    assert annotation.faces == [{"score": 0.95, "box": CENTRE}]
    assert fake.targets == ["RekognitionService.DetectFaces"]


# ---- failures ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("failure", "kind", "retryable", "status"),
    [
        ("throttled", ErrorKind.THROTTLED, True, 400),
        ("server_error", ErrorKind.SERVER, True, 500),
        ("unavailable", ErrorKind.UNAVAILABLE, True, 503),
        ("bad_request", ErrorKind.BAD_REQUEST, False, 400),
        ("forbidden", ErrorKind.FORBIDDEN, False, 403),
        ("unauthorized", ErrorKind.UNAUTHORIZED, False, 400),
    ],
)
def test_request_failures_raise_one_request_each(fake, provider, image, failure, kind, retryable, status):
    fake.behaviour.fail_next(1, failure)
    with pytest.raises(ApiError) as caught:
        provider.annotate([image], "tag")
    assert (caught.value.kind, caught.value.retryable, caught.value.status) == (kind, retryable, status)
    # botocore would retry throttling and 5xx by itself; the runner owns retries, so exactly one request.
    assert fake.behaviour.requests == 1
    assert SECRET_KEY not in caught.value.message and ACCESS_KEY not in caught.value.message
    # The next call goes through: nothing sticky in the client.
    assert provider.annotate([image], "tag")[0].labels[0]["name"] == "Red"


def test_throttle_carries_retry_after(fake, provider, image):
    fake.behaviour.fail_next(1, "throttled", retry_after=2.5)
    with pytest.raises(ApiError) as caught:
        provider.annotate([image], "detect_faces")
    assert caught.value.kind == ErrorKind.THROTTLED and caught.value.retry_after == 2.5
    assert fake.behaviour.requests == 1


def test_server_quota_throttles_without_botocore_retrying(tmp_path, image):
    with RekognitionFake(FakeBehaviour(max_batch=1, requests_per_s=1.0)) as server:
        provider = create_aws_provider(ProviderSettings(endpoint=server.endpoint))
        provider.annotate([image], "tag")
        with pytest.raises(ApiError) as caught:
            provider.annotate([image], "tag")
        assert caught.value.kind == ErrorKind.THROTTLED and caught.value.retry_after == 1.0
        assert server.behaviour.requests == 2 and server.behaviour.throttled == 1


@pytest.mark.parametrize(("failure", "kind"), [("invalid_image", ErrorKind.INVALID_IMAGE)])
def test_image_failures_come_back_per_image(fake, provider, image, failure, kind):
    fake.behaviour.fail_image(image.sha256, failure)
    [result] = provider.annotate([image], "ocr")
    assert isinstance(result, ImageError)
    assert result.kind == kind and not result.retryable
    assert fake.behaviour.requests == 1


def test_server_side_size_limit_is_an_image_error(image):
    with RekognitionFake(FakeBehaviour(max_batch=1, max_image_bytes=len(image.data) - 1)) as server:
        provider = create_aws_provider(ProviderSettings(endpoint=server.endpoint))
        [result] = provider.annotate([image], "tag")
    assert isinstance(result, ImageError) and result.kind == ErrorKind.TOO_LARGE
    assert server.behaviour.requests == 1


def test_undecodable_bytes_are_an_invalid_image(fake, provider):
    junk = ImageInput("junk.jpg", "0" * 64, b"not a jpeg at all", 10, 10, "JPEG")
    [result] = provider.annotate([junk], "tag")
    assert isinstance(result, ImageError) and result.kind == ErrorKind.INVALID_IMAGE


def test_oversized_and_unsupported_images_are_not_sent(fake, provider, image):
    big = ImageInput("big.jpg", "1" * 64, b"\xff" * (5 * 1024 * 1024 + 1), 4000, 4000, "JPEG")
    gif = ImageInput("a.gif", "2" * 64, b"GIF89a", 1, 1, "GIF")
    [too_large] = provider.annotate([big], "tag")
    [unsupported] = provider.annotate([gif], "tag")
    assert too_large.kind == ErrorKind.TOO_LARGE and unsupported.kind == ErrorKind.UNSUPPORTED_FORMAT
    assert fake.behaviour.requests == 0
    with pytest.raises(ApiError) as caught:
        provider.annotate([image], "segment")
    assert caught.value.kind == ErrorKind.UNSUPPORTED_FEATURE
    with pytest.raises(ValueError, match="1 image per request"):
        provider.annotate([image, image], "tag")
    assert provider.annotate([], "tag") == []


def test_timeout(image):
    # The server hangs 3 s, ten times the read timeout: giving up at the timeout ends the call long before the
    # hang does, with a margin no loaded CI machine eats (a tight bound in the overlap test failed under load).
    with RekognitionFake(FakeBehaviour(max_batch=1, hang_s=3.0)) as server:
        provider = create_aws_provider(ProviderSettings(endpoint=server.endpoint, timeout_s=0.3))
        server.behaviour.fail_next(1, "timeout")
        started = time.monotonic()
        with pytest.raises(ApiError) as caught:
            provider.annotate([image], "tag")
        elapsed = time.monotonic() - started
        assert caught.value.kind == ErrorKind.TIMEOUT and caught.value.retryable
        assert elapsed < 2.0  # gave up at the read timeout, and did not retry
        assert server.behaviour.requests == 1
        # The pool drops the timed-out connection; the next call answers.
        assert provider.annotate([image], "tag")[0].labels[0]["name"] == "Red"


def test_connection_refused_is_unavailable(image):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    provider = create_aws_provider(ProviderSettings(endpoint=f"http://127.0.0.1:{port}", timeout_s=1.0))
    with pytest.raises(ApiError) as caught:
        provider.annotate([image], "tag")
    assert caught.value.kind == ErrorKind.UNAVAILABLE and caught.value.retryable


def test_concurrent_calls_overlap(tmp_path):
    images = [image_input(make_image(tmp_path / f"{i}.jpg", COLOURS["blue"], seed=10 + i)) for i in range(8)]
    with RekognitionFake(FakeBehaviour(max_batch=1, latency_s=0.3)) as server:
        provider = create_aws_provider(ProviderSettings(endpoint=server.endpoint))
        results: list = [None] * len(images)

        def work(index: int) -> None:
            results[index] = provider.annotate([images[index]], "tag")[0]

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(images))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert all(result.labels[0]["name"] == "Blue" for result in results)
    assert server.behaviour.requests == 8
    # Overlap, not wall time (a loaded machine stretches that): serial calls would arrive 0.3 s or more apart;
    # here most arrive while another request is still being answered.
    arrivals = sorted(server.behaviour.arrivals)
    gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:], strict=False)]
    assert sum(gap < 0.3 for gap in gaps) >= 4, arrivals


# ---- credentials ---------------------------------------------------------------------------------------------
def test_missing_credentials_name_what_to_set(monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ProviderConfigError, match="AWS_ACCESS_KEY_ID") as caught:
        create_provider("aws", ProviderSettings(endpoint="http://127.0.0.1:9"))
    assert "AWS_SECRET_ACCESS_KEY" in str(caught.value) and "AWS_PROFILE" in str(caught.value)


def test_unknown_profile_names_aws_profile(monkeypatch):
    monkeypatch.setenv("AWS_PROFILE", "nobody")
    with pytest.raises(ProviderConfigError, match="AWS_PROFILE"):
        create_provider("aws", ProviderSettings(endpoint="http://127.0.0.1:9"))


def test_region_from_settings_then_chain(monkeypatch):
    assert create_aws_provider(ProviderSettings(region="eu-west-1")).region == "eu-west-1"
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    assert create_aws_provider(ProviderSettings()).region == "us-east-1"


def test_secret_key_never_travels(fake, provider, image):
    provider.annotate([image], "tag")
    fake.behaviour.fail_next(1, "unauthorized")
    with pytest.raises(ApiError):
        provider.annotate([image], "tag")
    [first, *_] = fake.behaviour.headers_seen
    # SigV4 sends the access key id and a signature; the secret key only ever signs.
    assert f"Credential={ACCESS_KEY}/" in first["Authorization"]
    assert first["X-Amz-Target"] == "RekognitionService.DetectLabels"
    for headers in fake.behaviour.headers_seen:
        assert all(SECRET_KEY not in f"{name}: {value}" for name, value in headers.items())


# ---- moto: its DetectLabels, and the S3 object option --------------------------------------------------------
@pytest.fixture(scope="module")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def test_detect_labels_against_moto(moto_endpoint, image):
    provider = create_aws_provider(ProviderSettings(endpoint=moto_endpoint))
    [annotation] = provider.annotate([image], "tag")
    assert annotation.labels and annotation.labels[0]["name"] == "Mobile Phone"
    assert 0.0 <= annotation.labels[0]["score"] <= 1.0
    [objects] = provider.annotate([image], "detect_objects")
    assert objects.objects and all(0.0 <= x <= 1.0 for x in objects.objects[0]["box"])


def test_s3_object_option_uploads_once(moto_endpoint, image):
    bucket = f"visionroute-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    settings = ProviderSettings(endpoint=moto_endpoint, s3_bucket=bucket)
    provider = create_aws_provider(settings)
    assert provider.max_image_bytes == 15 * 1024 * 1024  # S3 objects may be larger than inline bytes

    [annotation] = provider.annotate([image], "tag")
    assert annotation.labels and annotation.labels[0]["name"] == "Mobile Phone"
    key = f"visionroute/{image.sha256}.jpg"
    stored = s3.get_object(Bucket=bucket, Key=key)
    assert stored["Body"].read() == image.data
    assert stored["ContentType"] == "image/jpeg"

    provider.annotate([image], "detect_objects")
    assert provider.uploads == 1
    # Another process finds the object with head_object and does not put it again.
    other = create_aws_provider(settings)
    other.annotate([image], "tag")
    assert other.uploads == 0


def test_s3_missing_bucket_is_a_request_error(moto_endpoint, image):
    provider = create_aws_provider(ProviderSettings(endpoint=moto_endpoint, s3_bucket="no-such-bucket-vr"))
    with pytest.raises(ApiError) as caught:
        provider.annotate([image], "tag")
    assert not caught.value.retryable
