"""The google provider through the real client library, over real gRPC and REST, against the local fakes."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from conftest import COLOURS, image_input, make_image
from fakes.behaviour import FakeBehaviour
from fakes.google_fake import GoogleGrpcFake, GoogleRestFake
from google.api_core import exceptions as core_exceptions
from google.cloud import vision
from google.cloud.vision_v1.services.image_annotator.transports import ImageAnnotatorGrpcTransport

from visionroute.vision.base import (
    Annotation,
    ApiError,
    ErrorKind,
    ImageError,
    ImageInput,
    Provider,
    ProviderConfigError,
    ProviderSettings,
    create_provider,
)
from visionroute.vision.google import GoogleVisionProvider, create_google_provider, credentials_file

CENTRE = [0.25, 0.25, 0.5, 0.5]
TRANSPORTS = ("grpc", "rest")
FAKES = {"grpc": GoogleGrpcFake, "rest": GoogleRestFake}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, list[ImageInput]]:
    """Real JPEG and PNG files: 16 per colour."""
    root = tmp_path_factory.mktemp("google_images")
    out: dict[str, list[ImageInput]] = {}
    for offset, name in enumerate(COLOURS):
        out[name] = [
            image_input(
                make_image(
                    root / f"{name}_{i}.{'png' if i % 2 else 'jpg'}",
                    COLOURS[name],
                    seed=100 * offset + i,
                    fmt="PNG" if i % 2 else "JPEG",
                )
            )
            for i in range(16)
        ]
    return out


class Served:
    """A running fake plus a factory for providers pointed at it; closes them all at the end."""

    def __init__(self, transport: str, behaviour: FakeBehaviour) -> None:
        self.transport = transport
        self.behaviour = behaviour
        self.fake = FAKES[transport](behaviour).start()
        self._providers: list[GoogleVisionProvider] = []

    def provider(self, **settings) -> GoogleVisionProvider:
        settings.setdefault("timeout_s", 5.0)
        provider = create_google_provider(
            ProviderSettings(endpoint=self.fake.endpoint, transport=self.transport, **settings)
        )
        self._providers.append(provider)
        return provider

    def close(self) -> None:
        for provider in self._providers:
            provider.close()
        self.fake.stop()


@pytest.fixture(params=TRANSPORTS)
def serve(request):
    """serve(**behaviour_kwargs) -> Served, for each transport."""
    started: list[Served] = []

    def start(**behaviour) -> Served:
        served = Served(request.param, FakeBehaviour(**behaviour))
        started.append(served)
        return served

    yield start
    for served in started:
        served.close()


# ---- the four features -------------------------------------------------------------------------------------


def test_conformance():
    provider = create_provider("google", ProviderSettings(endpoint="http://127.0.0.1:9"))
    try:
        assert isinstance(provider, GoogleVisionProvider)
        assert isinstance(provider, Provider)
        assert provider.features() == {"tag", "ocr", "detect_objects", "detect_faces"}
        assert (provider.name, provider.api_version, provider.max_batch) == ("google", "v1", 16)
        assert provider.max_image_bytes == 20 * 1024 * 1024
        assert {"JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF"} <= provider.formats
        assert provider.default_quota.requests_per_s == 30.0 and provider.default_quota.units_per_s == 30.0
    finally:
        provider.close()


def test_tag(serve, images):
    provider = serve().provider()
    batch = [images["red"][0], images["green"][1], images["blue"][2]]
    results = provider.annotate(batch, "tag")
    assert [r.labels[0]["name"] for r in results] == ["Red", "Green", "Blue"]
    assert results[0].labels == [{"name": "Red", "score": 0.9}, {"name": "Image", "score": 0.5}]
    assert not results[0].text and not results[0].objects and not results[0].faces


def test_ocr_text_detection(serve, images):
    provider = serve().provider()
    image = images["red"][3]
    [result] = provider.annotate([image], "ocr")
    assert result.text == [{"text": f"TEXT {image.sha256[:8]}", "box": CENTRE, "score": None}]


def test_ocr_document_mode(serve, images):
    provider = serve().provider(ocr_mode="document")
    image = images["blue"][4]
    [result] = provider.annotate([image], "ocr")
    [block] = result.text
    assert block["text"] == f"TEXT {image.sha256[:8]}"
    assert block["box"] == pytest.approx(CENTRE, abs=1e-4)
    assert block["score"] == pytest.approx(0.98)


def test_detect_objects(serve, images):
    provider = serve().provider()
    [result] = provider.annotate([images["green"][5]], "detect_objects")
    [obj] = result.objects
    assert obj["name"] == "Green" and obj["score"] == pytest.approx(0.8)
    assert obj["box"] == pytest.approx(CENTRE, abs=1e-4)


def test_detect_faces(serve, images):
    provider = serve().provider()
    [result] = provider.annotate([images["red"][6]], "detect_faces")
    [face] = result.faces
    assert face["score"] == pytest.approx(0.95)
    assert face["box"] == pytest.approx(CENTRE, abs=1e-4)


def test_odd_sized_image_boxes_are_fractions(serve, tmp_path):
    """Pixel vertices are integers: an odd size still gives the centre quarter within rounding."""
    provider = serve().provider()
    image = image_input(make_image(tmp_path / "odd.png", COLOURS["blue"], 7, size=(101, 67), fmt="PNG"))
    [result] = provider.annotate([image], "detect_faces")
    assert result.faces[0]["box"] == pytest.approx(CENTRE, abs=0.02)


def test_client_headers_reach_the_fake(serve, images):
    served = serve()
    served.provider().annotate([images["red"][0]], "tag")
    [headers] = served.behaviour.headers_seen
    assert "gapic/" in {k.lower(): v for k, v in headers.items()}["x-goog-api-client"]


# ---- per-image errors --------------------------------------------------------------------------------------


def test_batch_of_16_with_one_invalid_image(serve, images):
    served = serve()
    batch = images["green"]
    served.behaviour.fail_image(batch[7].sha256, "invalid_image")
    results = served.provider().annotate(batch, "tag")
    assert len(results) == 16
    assert results[7] == ImageError(ErrorKind.INVALID_IMAGE, "Bad image data.")
    assert not results[7].retryable
    others = results[:7] + results[8:]
    assert all(isinstance(r, Annotation) and r.labels[0]["name"] == "Green" for r in others)
    assert served.behaviour.requests == 1


def test_undecodable_bytes_are_an_invalid_image(serve, images):
    provider = serve().provider()
    junk = ImageInput("junk.jpg", hashlib.sha256(b"junk").hexdigest(), b"not an image", 10, 10, "JPEG")
    results = provider.annotate([images["red"][0], junk], "tag")
    assert isinstance(results[0], Annotation)
    assert results[1].kind == ErrorKind.INVALID_IMAGE


def test_oversized_image_is_too_large(serve, images):
    image = images["red"][0]
    provider = serve(max_image_bytes=len(image.data) - 1).provider()
    [result] = provider.annotate([image], "tag")
    assert result.kind == ErrorKind.TOO_LARGE and "exceeds" in result.message


def test_per_image_throttle_is_retryable(serve, images):
    served = serve()
    served.behaviour.fail_image(images["blue"][0].sha256, "throttled", times=1)
    provider = served.provider()
    [first] = provider.annotate([images["blue"][0]], "tag")
    assert first.kind == ErrorKind.THROTTLED and first.retryable
    [second] = provider.annotate([images["blue"][0]], "tag")
    assert isinstance(second, Annotation)


# ---- whole-request failures --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "kind", "retryable", "status"),
    [
        ("throttled", ErrorKind.THROTTLED, True, 429),
        ("unavailable", ErrorKind.UNAVAILABLE, True, 503),
        ("server_error", ErrorKind.SERVER, True, 500),
        ("bad_request", ErrorKind.BAD_REQUEST, False, 400),
        ("invalid_image", ErrorKind.BAD_REQUEST, False, 400),
        ("unauthorized", ErrorKind.UNAUTHORIZED, False, 401),
        ("forbidden", ErrorKind.FORBIDDEN, False, 403),
    ],
)
def test_whole_request_failure(serve, images, failure, kind, retryable, status):
    served = serve()
    served.behaviour.fail_next(1, failure)
    provider = served.provider()
    with pytest.raises(ApiError) as caught:
        provider.annotate(images["red"][:2], "tag")
    assert (caught.value.kind, caught.value.retryable, caught.value.status) == (kind, retryable, status)
    assert caught.value.retry_after is None
    # Our runner retries, not the library: exactly one request reached the server.
    assert served.behaviour.requests == 1
    assert isinstance(provider.annotate(images["red"][:2], "tag")[0], Annotation)


def test_retry_after_is_passed_on(serve, images):
    served = serve()
    served.behaviour.fail_next(1, "throttled", retry_after=2.5)
    with pytest.raises(ApiError) as caught:
        served.provider().annotate(images["red"][:1], "tag")
    assert caught.value.kind == ErrorKind.THROTTLED and caught.value.retry_after == pytest.approx(2.5)


def test_timeout(serve, images):
    served = serve(hang_s=1.0)
    served.behaviour.fail_next(1, "timeout")
    provider = served.provider(timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(ApiError) as caught:
        provider.annotate(images["red"][:1], "tag")
    assert caught.value.kind == ErrorKind.TIMEOUT and caught.value.retryable
    assert time.monotonic() - started < 0.9
    assert served.behaviour.requests == 1


def test_fake_throttles_over_its_quota(serve, images):
    served = serve(requests_per_s=2)
    provider = served.provider()
    for _ in range(2):
        assert isinstance(provider.annotate(images["red"][:1], "tag")[0], Annotation)
    with pytest.raises(ApiError) as caught:
        provider.annotate(images["red"][:1], "tag")
    assert caught.value.kind == ErrorKind.THROTTLED and caught.value.retry_after == pytest.approx(1.0)
    assert served.behaviour.throttled == 1


def test_fake_throttles_over_its_image_quota(serve, images):
    served = serve(units_per_s=4)  # the bucket starts with one full batch (16 images)
    provider = served.provider()
    assert len(provider.annotate(images["blue"], "tag")) == 16
    with pytest.raises(ApiError) as caught:
        provider.annotate(images["blue"][:2], "tag")
    assert caught.value.kind == ErrorKind.THROTTLED


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_connection_refused_is_unavailable(transport, images):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    provider = create_google_provider(
        ProviderSettings(endpoint=f"http://127.0.0.1:{port}", transport=transport, timeout_s=2.0)
    )
    try:
        with pytest.raises(ApiError) as caught:
            provider.annotate(images["red"][:1], "tag")
        assert caught.value.kind == ErrorKind.UNAVAILABLE and caught.value.retryable
    finally:
        provider.close()


def test_many_concurrent_requests(serve, images):
    served = serve(latency_s=0.05)
    provider = served.provider()
    batches = [images["green"][i % 16 : i % 16 + 1] for i in range(48)]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=24) as pool:
        results = list(pool.map(lambda batch: provider.annotate(batch, "tag"), batches))
    assert all(r[0].labels[0]["name"] == "Green" for r in results)
    assert served.behaviour.requests == 48
    assert time.monotonic() - started < 2.0  # ~0.1 s if served concurrently, 2.4 s if serialised


def test_provider_refuses_more_than_16(images):
    provider = create_google_provider(ProviderSettings(endpoint="http://127.0.0.1:9"))
    try:
        with pytest.raises(ValueError, match="at most 16"):
            provider.annotate(images["red"] + images["blue"][:1], "tag")
    finally:
        provider.close()


def test_grpc_fake_rejects_more_than_16(images):
    """The fake enforces Google's limit itself (checked with a bare client, as the provider never sends 17)."""
    with GoogleGrpcFake(FakeBehaviour(max_batch=32)) as fake:
        channel = grpc.insecure_channel(fake.endpoint.removeprefix("http://"))
        client = vision.ImageAnnotatorClient(transport=ImageAnnotatorGrpcTransport(channel=channel))
        feature = vision.Feature(type_=vision.Feature.Type.LABEL_DETECTION)
        request = vision.BatchAnnotateImagesRequest(
            requests=[
                vision.AnnotateImageRequest(image=vision.Image(content=image.data), features=[feature])
                for image in images["red"] + images["blue"][:1]
            ]
        )
        with pytest.raises(core_exceptions.InvalidArgument):
            client.batch_annotate_images(request=request, retry=None, timeout=5)
        client.transport.close()


# ---- configuration and credentials -------------------------------------------------------------------------


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    """No GOOGLE_APPLICATION_CREDENTIALS and empty gcloud config folders."""
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    return tmp_path


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("endpoint", [None, "eu-vision.googleapis.com", "https://vision.example.com"])
def test_missing_credentials_is_a_config_error(no_credentials, transport, endpoint):
    with pytest.raises(ProviderConfigError, match="GOOGLE_APPLICATION_CREDENTIALS") as caught:
        create_provider("google", ProviderSettings(endpoint=endpoint, transport=transport))
    assert "service-account key file" in str(caught.value)


def test_unloadable_credentials_file_is_named_not_quoted(no_credentials, monkeypatch):
    key = no_credentials / "key.json"
    key.write_text(json.dumps({"type": "service_account", "private_key": "SECRET-KEY-MATERIAL"}))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    with pytest.raises(ProviderConfigError, match="GOOGLE_APPLICATION_CREDENTIALS") as caught:
        create_google_provider(ProviderSettings())
    assert "SECRET" not in str(caught.value) and str(key) not in str(caught.value)


def test_credentials_path_to_a_missing_file(no_credentials, monkeypatch):
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(no_credentials / "nope.json"))
    with pytest.raises(ProviderConfigError, match="GOOGLE_APPLICATION_CREDENTIALS"):
        create_google_provider(ProviderSettings())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_gcloud_adc_file_is_used(no_credentials, transport):
    """gcloud's ADC file in $CLOUDSDK_CONFIG is enough to build the client (nothing is contacted)."""
    adc = no_credentials / "gcloud" / "application_default_credentials.json"
    adc.parent.mkdir(parents=True)
    adc.write_text(
        json.dumps({"type": "authorized_user", "client_id": "i", "client_secret": "s", "refresh_token": "r"})
    )
    assert credentials_file() == (str(adc), "gcloud application-default credentials")
    provider = create_google_provider(ProviderSettings(transport=transport))
    assert provider.transport == transport
    assert type(provider._client.transport._credentials).__name__ == "Credentials"  # google.oauth2 user creds
    provider.close()


def test_bad_settings_are_config_errors():
    with pytest.raises(ProviderConfigError, match="transport"):
        create_google_provider(ProviderSettings(endpoint="http://127.0.0.1:9", transport="http2"))
    with pytest.raises(ProviderConfigError, match="ocr_mode"):
        create_google_provider(ProviderSettings(endpoint="http://127.0.0.1:9", ocr_mode="handwriting"))
