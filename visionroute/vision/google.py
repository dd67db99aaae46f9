"""Google Cloud Vision (v1) provider: one `batch_annotate_images` call per batch of up to 16 images, over gRPC
(default) or REST, normalised to `Annotation` / `ImageError`.

Retries, rate limiting and concurrency belong to `visionroute.vision.runner`; this module disables the client
library's own retries so that the runner's policy is the only one.
"""

from __future__ import annotations

import email.utils
import os
import re
import time
from pathlib import Path
from typing import Any

import grpc
import requests
from google.api_core import exceptions as core_exceptions
from google.auth import credentials as ga_credentials
from google.auth import exceptions as auth_exceptions
from google.cloud import vision
from google.cloud.vision_v1.services.image_annotator.transports import ImageAnnotatorGrpcTransport
from google.rpc import error_details_pb2

from visionroute.vision.base import (
    FEATURES,
    Annotation,
    ApiError,
    ErrorKind,
    ImageError,
    ImageInput,
    ProviderConfigError,
    ProviderSettings,
    Quota,
    box_from_points,
    register_provider,
)

CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
MAX_RESULTS = 20
"""Per feature; ignored by Google for text detection, which always returns all the text."""

_FEATURE_TYPES = {
    "tag": vision.Feature.Type.LABEL_DETECTION,
    "ocr": vision.Feature.Type.TEXT_DETECTION,
    "detect_objects": vision.Feature.Type.OBJECT_LOCALIZATION,
    "detect_faces": vision.Feature.Type.FACE_DETECTION,
}

# google.rpc.Code of a per-image `response.error` -> our kind. INVALID_ARGUMENT on one image of an answered
# batch means the service could not use that image (undecodable, or over a size limit: see _image_error).
_IMAGE_ERROR_KINDS = {
    3: ErrorKind.INVALID_IMAGE,
    4: ErrorKind.TIMEOUT,
    7: ErrorKind.FORBIDDEN,
    8: ErrorKind.THROTTLED,
    13: ErrorKind.SERVER,
    14: ErrorKind.UNAVAILABLE,
    16: ErrorKind.UNAUTHORIZED,
}

# Most specific class first: ResourceExhausted < TooManyRequests, DeadlineExceeded < GatewayTimeout < ServerError,
# InvalidArgument < BadRequest, Unauthenticated < Unauthorized, PermissionDenied < Forbidden.
_EXCEPTION_KINDS: tuple[tuple[type[Exception], str], ...] = (
    (core_exceptions.TooManyRequests, ErrorKind.THROTTLED),
    (core_exceptions.ServiceUnavailable, ErrorKind.UNAVAILABLE),
    (core_exceptions.GatewayTimeout, ErrorKind.TIMEOUT),
    # ABORTED and CANCELLED (we never cancel) are transient by gRPC's own definitions.
    (core_exceptions.Aborted, ErrorKind.UNAVAILABLE),
    (core_exceptions.Cancelled, ErrorKind.UNAVAILABLE),
    # 501 UNIMPLEMENTED (a wrong private endpoint, a method it does not serve) will not work on a retry.
    (core_exceptions.MethodNotImplemented, ErrorKind.BAD_REQUEST),
    (core_exceptions.ServerError, ErrorKind.SERVER),
    (core_exceptions.Unauthorized, ErrorKind.UNAUTHORIZED),
    (core_exceptions.Forbidden, ErrorKind.FORBIDDEN),
    (core_exceptions.BadRequest, ErrorKind.BAD_REQUEST),
)


class GoogleVisionProvider:
    """Google Cloud Vision through `google.cloud.vision.ImageAnnotatorClient`.

    `settings.endpoint` of the form `http://host:port` means a plaintext endpoint (a private endpoint or a
    local fake): no credentials are looked up and the channel is not TLS. Any other endpoint (or None, for
    vision.googleapis.com) needs GOOGLE_APPLICATION_CREDENTIALS or gcloud's application-default credentials.
    """

    name = "google"
    api_version = "v1"
    max_batch = 16
    max_image_bytes: int | None = 20 * 1024 * 1024
    """Google's documented image file limit (20 MB). The REST transport's JSON request is also capped (10 MB,
    base64 adds ~37%), which a large image sent over REST can still exceed: that comes back as BAD_REQUEST."""
    # PIL names of what Google decodes (JPEG, PNG, GIF, BMP, WEBP, RAW, ICO, PDF, TIFF); MPO is PIL's name for
    # multi-picture JPEGs from cameras, which are JPEG files. RAW and PDF have no PIL reader, so never occur.
    formats: frozenset[str] | None = frozenset({"JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP", "ICO", "TIFF"})
    default_quota = Quota(requests_per_s=30.0, units_per_s=30.0)

    def __init__(self, settings: ProviderSettings | None = None) -> None:
        self.settings = settings or ProviderSettings()
        transport = (self.settings.transport or "grpc").lower()
        if transport not in ("grpc", "rest"):
            raise ProviderConfigError(f"google: transport must be 'grpc' or 'rest', not {transport!r}")
        if self.settings.ocr_mode not in ("text", "document"):
            raise ProviderConfigError(
                f"google: ocr_mode must be 'text' or 'document', not {self.settings.ocr_mode!r}"
            )
        self.transport = transport
        self.endpoint = self.settings.endpoint
        self._client = _make_client(transport, self.settings.endpoint)

    def features(self) -> frozenset[str]:
        """All four generic tasks."""
        return frozenset(FEATURES)

    def feature_type(self, feature: str) -> vision.Feature.Type:
        """The Google feature type a generic task is sent as (OCR depends on `settings.ocr_mode`)."""
        if feature == "ocr" and self.settings.ocr_mode == "document":
            return vision.Feature.Type.DOCUMENT_TEXT_DETECTION
        try:
            return _FEATURE_TYPES[feature]
        except KeyError:
            raise ApiError(ErrorKind.UNSUPPORTED_FEATURE, f"google does not serve {feature!r}") from None

    def annotate(self, images: list[ImageInput], feature: str) -> list[Annotation | ImageError]:
        """One `batch_annotate_images` request; one Annotation or ImageError per image, in order. Raises
        ApiError when the whole request fails."""
        feature_type = self.feature_type(feature)
        if not images:
            return []
        if len(images) > self.max_batch:
            raise ValueError(f"google takes at most {self.max_batch} images per request, got {len(images)}")
        request = vision.BatchAnnotateImagesRequest(
            requests=[
                vision.AnnotateImageRequest(
                    image=vision.Image(content=image.data),
                    features=[vision.Feature(type_=feature_type, max_results=MAX_RESULTS)],
                )
                for image in images
            ]
        )
        try:
            # retry=None: the library's default policy would retry UNAVAILABLE/DEADLINE_EXCEEDED itself, under
            # the runner's own retries and outside its rate limiter.
            response = self._client.batch_annotate_images(
                request=request, retry=None, timeout=self.settings.timeout_s
            )
        except core_exceptions.GoogleAPICallError as exc:
            raise _api_error(exc) from exc
        except requests.exceptions.Timeout as exc:  # REST: client-side timeout (connect or read)
            raise ApiError(ErrorKind.TIMEOUT, f"no answer within {self.settings.timeout_s} s") from exc
        except requests.exceptions.ConnectionError as exc:  # REST: refused, reset, DNS
            raise ApiError(ErrorKind.UNAVAILABLE, f"connection failed: {type(exc).__name__}") from exc
        except (
            auth_exceptions.RefreshError,
            auth_exceptions.InvalidOperation,
        ) as exc:  # the credential was refused while refreshing its token
            raise ApiError(ErrorKind.UNAUTHORIZED, "credential refresh was refused") from exc
        except auth_exceptions.TransportError as exc:  # the token endpoint could not be reached
            raise ApiError(ErrorKind.UNAVAILABLE, "could not reach the token endpoint") from exc
        if len(response.responses) != len(images):
            raise ApiError(
                ErrorKind.SERVER,
                f"google answered {len(response.responses)} images for a request of {len(images)}",
            )
        return [
            _normalise(image, answer, feature_type)
            for image, answer in zip(images, response.responses, strict=True)
        ]

    def close(self) -> None:
        """Close the client's channel or HTTP session."""
        self._client.transport.close()


@register_provider("google")
def create_google_provider(settings: ProviderSettings) -> GoogleVisionProvider:
    """The registry's factory; raises ProviderConfigError naming what to set when no credential is found."""
    return GoogleVisionProvider(settings)


# ---- client construction -----------------------------------------------------------------------------------


def _make_client(transport: str, endpoint: str | None) -> vision.ImageAnnotatorClient:
    """The client for a transport and endpoint; plaintext endpoints get no credentials, others must have some."""
    if endpoint and endpoint.startswith("http://"):
        if transport == "grpc":
            # The default channel is TLS even with AnonymousCredentials, so a plaintext endpoint needs an
            # explicit insecure channel; a transport given a channel ignores credentials altogether.
            channel = grpc.insecure_channel(
                endpoint.removeprefix("http://").rstrip("/"),
                options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)],
            )
            return vision.ImageAnnotatorClient(transport=ImageAnnotatorGrpcTransport(channel=channel))
        # The REST transport keeps an explicit http:// scheme (it prepends https:// only when none is given).
        client = vision.ImageAnnotatorClient(
            transport="rest",
            credentials=ga_credentials.AnonymousCredentials(),
            client_options={"api_endpoint": endpoint.rstrip("/")},
        )
        _tune_rest_session(client, anonymous=True)
        return client
    credentials = _load_credentials()
    options: dict[str, str] = {}
    if endpoint:
        # gRPC wants host[:port]; REST takes a scheme or prepends https:// itself.
        options["api_endpoint"] = endpoint.removeprefix("https://") if transport == "grpc" else endpoint
    client = vision.ImageAnnotatorClient(
        transport=transport, credentials=credentials, client_options=options or None
    )
    if transport == "rest":
        _tune_rest_session(client, anonymous=False)
    return client


def _tune_rest_session(client: vision.ImageAnnotatorClient, *, anonymous: bool) -> None:
    """Adjust the REST transport's AuthorizedSession (a private attribute, hence the guards)."""
    session = getattr(client.transport, "_session", None)
    if session is None:
        return
    if anonymous and hasattr(session, "_refresh_status_codes"):
        # On a 401 the session refreshes the credential and resends; anonymous credentials cannot refresh
        # (InvalidOperation), so let the 401 through as the answer it is.
        session._refresh_status_codes = ()
    if getattr(session, "is_mtls", False):  # leave an mTLS adapter alone
        return
    # requests keeps 10 connections per host; the runner may have more requests in flight than that.
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=64)
    session.mount("http://", adapter)
    session.mount("https://", adapter)


def credentials_file() -> tuple[str, str] | None:
    """(path, where it came from) of the credential file the provider would use, or None. Never contacts
    the GCE metadata server, unlike `google.auth.default()` when it finds no file."""
    env = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if env:
        if not Path(env).is_file():
            raise ProviderConfigError(
                "google: GOOGLE_APPLICATION_CREDENTIALS is set but does not name an existing file; set it to "
                "a service-account key file (or unset it and run `gcloud auth application-default login`)"
            )
        return env, "GOOGLE_APPLICATION_CREDENTIALS"
    if os.environ.get("CLOUDSDK_CONFIG"):
        config = Path(os.environ["CLOUDSDK_CONFIG"])
    elif os.name == "nt" and os.environ.get("APPDATA"):
        config = Path(os.environ["APPDATA"]) / "gcloud"
    else:
        config = Path.home() / ".config" / "gcloud"
    adc = config / "application_default_credentials.json"
    return (str(adc), "gcloud application-default credentials") if adc.is_file() else None


def _load_credentials() -> ga_credentials.Credentials:
    found = credentials_file()
    if found is None:
        raise ProviderConfigError(
            "google: no credentials found; set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file "
            "(or run `gcloud auth application-default login`)"
        )
    path, source = found
    try:
        credentials, _ = _load_credentials_file(path)
    except (auth_exceptions.GoogleAuthError, ValueError, OSError) as exc:
        # Only the exception's type: google.auth messages may quote the file's fields.
        raise ProviderConfigError(
            f"google: the credential file from {source} could not be loaded ({type(exc).__name__}); set "
            "GOOGLE_APPLICATION_CREDENTIALS to a valid service-account key file"
        ) from None
    return credentials


def _load_credentials_file(path: str) -> tuple[ga_credentials.Credentials, str | None]:
    """Load a service-account key, authorized-user (gcloud ADC) or external-account file, scoped for Vision."""
    import google.auth

    return google.auth.load_credentials_from_file(path, default_scopes=[CLOUD_PLATFORM_SCOPE])


# ---- errors ------------------------------------------------------------------------------------------------


def _api_error(exc: core_exceptions.GoogleAPICallError) -> ApiError:
    kind = next((kind for cls, kind in _EXCEPTION_KINDS if isinstance(exc, cls)), None)
    if kind is None:
        kind = ErrorKind.SERVER if (exc.code or 0) >= 500 else ErrorKind.BAD_REQUEST
    status: int | str | None = exc.code
    if status is None and exc.grpc_status_code is not None:
        status = exc.grpc_status_code.name
    message = exc.message or type(exc).__name__
    return ApiError(kind, message[:500], status=status, retry_after=_retry_after(exc))


def _retry_after(exc: core_exceptions.GoogleAPICallError) -> float | None:
    """The server's retry delay: REST's Retry-After header, else a google.rpc.RetryInfo detail (gRPC gives
    parsed messages, REST the JSON form)."""
    response = exc.response
    headers = getattr(response, "headers", None)
    header = headers.get("Retry-After") if headers is not None else None
    if header:
        try:
            return max(float(header), 0.0)
        except ValueError:
            try:
                return max(email.utils.parsedate_to_datetime(header).timestamp() - time.time(), 0.0)
            except (TypeError, ValueError):
                pass
    for detail in exc.details or ():
        if isinstance(detail, error_details_pb2.RetryInfo):
            return detail.retry_delay.seconds + detail.retry_delay.nanos / 1e9
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            match = re.fullmatch(r"(\d+(?:\.\d+)?)s", str(detail.get("retryDelay", "")))
            if match:
                return float(match.group(1))
    return None


def _image_error(error: Any) -> ImageError:
    message = error.message or f"google.rpc code {error.code}"
    kind = _IMAGE_ERROR_KINDS.get(error.code, ErrorKind.BAD_REQUEST)
    if error.code == 3 and re.search(r"size|too large|exceeds", message, re.IGNORECASE):
        kind = ErrorKind.TOO_LARGE
    return ImageError(kind, message)


# ---- normalisation -----------------------------------------------------------------------------------------


def _normalise(
    image: ImageInput, answer: vision.AnnotateImageResponse, feature_type: int
) -> Annotation | ImageError:
    if answer.error.code:
        return _image_error(answer.error)
    result = Annotation()
    if feature_type == vision.Feature.Type.LABEL_DETECTION:
        labels = [
            {"name": item.description, "score": _score(item.score)} for item in answer.label_annotations
        ]
        result.labels = sorted(labels, key=lambda item: -item["score"])
    elif feature_type == vision.Feature.Type.TEXT_DETECTION:
        # The first entry is the whole text; the rest are its words with their own boxes.
        items = answer.text_annotations
        items = items[1:] if len(items) > 1 else items[:1]
        result.text = [
            {
                "text": item.description,
                "box": _poly_box(item.bounding_poly, image),
                "score": _score(item.confidence) or None,  # Google leaves it unset for text
            }
            for item in items
        ]
    elif feature_type == vision.Feature.Type.DOCUMENT_TEXT_DETECTION:
        result.text = [
            {
                "text": _block_text(block),
                "box": _poly_box(block.bounding_box, image),
                "score": _score(block.confidence) or None,
            }
            for page in answer.full_text_annotation.pages
            for block in page.blocks
        ]
    elif feature_type == vision.Feature.Type.OBJECT_LOCALIZATION:
        result.objects = [
            {"name": item.name, "score": _score(item.score), "box": _poly_box(item.bounding_poly, image)}
            for item in answer.localized_object_annotations
        ]
    elif feature_type == vision.Feature.Type.FACE_DETECTION:
        result.faces = [
            {"score": _score(item.detection_confidence), "box": _poly_box(item.bounding_poly, image)}
            for item in answer.face_annotations
        ]
    return result


def _score(value: float) -> float:
    """Scores travel as float32: round off the noise (0.9 arrives as 0.89999997...)."""
    return round(float(value), 5)


def _poly_box(poly: vision.BoundingPoly, image: ImageInput) -> list[float]:
    """Pixel `vertices` (text, faces) or fractional `normalized_vertices` (objects) -> [l, t, w, h] fractions."""
    if poly.vertices:
        return box_from_points([(v.x, v.y) for v in poly.vertices], image.width or 1, image.height or 1)
    return box_from_points([(v.x, v.y) for v in poly.normalized_vertices])


def _block_text(block: vision.Block) -> str:
    """A block's words joined by spaces, its paragraphs by newlines (Google sends symbols, not strings)."""
    paragraphs = [
        " ".join("".join(symbol.text for symbol in word.symbols) for word in paragraph.words)
        for paragraph in block.paragraphs
    ]
    return "\n".join(paragraphs)
