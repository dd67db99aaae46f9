"""Azure AI Vision Image Analysis 4.0 (`azure-ai-vision-imageanalysis`): tags, OCR (READ) and objects.

One image per request, sent as raw bytes. Credentials come from the environment the way Microsoft's samples
read them: VISION_ENDPOINT (or the spec's `endpoint:`) and VISION_KEY. The key lives only inside the SDK's
`AzureKeyCredential`, whose repr does not show it, so it never reaches a message, a log line or a repr.

Faces are not served: Image Analysis 4.0 has no face detection, and the separate Face API is access-gated.
"""

from __future__ import annotations

import email.utils
import os
import time
from typing import Any

from azure.ai.vision.imageanalysis import ImageAnalysisClient
from azure.ai.vision.imageanalysis.models import ImageAnalysisResult, VisualFeatures
from azure.core.credentials import AzureKeyCredential
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ServiceRequestError,
    ServiceRequestTimeoutError,
    ServiceResponseError,
    ServiceResponseTimeoutError,
)

from visionroute.vision.base import (
    Annotation,
    ApiError,
    ErrorKind,
    ImageError,
    ImageInput,
    ProviderConfigError,
    ProviderSettings,
    Quota,
    box_from_points,
    clamp_box,
    register_provider,
)

ENDPOINT_ENV = "VISION_ENDPOINT"
KEY_ENV = "VISION_KEY"
API_VERSION = "2023-10-01"
"""The REST api-version azure-ai-vision-imageanalysis 1.0.0 speaks (its configuration's default)."""

_FEATURES = {
    "tag": VisualFeatures.TAGS,
    "ocr": VisualFeatures.READ,
    "detect_objects": VisualFeatures.OBJECTS,
}

# Azure's 400 answers carry the reason in error.code or, on the live service, in error.innererror.code
# (code "InvalidRequest"); these are about the image itself, so they come back per image, not raised.
_INVALID_IMAGE_CODES = frozenset(
    {"InvalidImageFormat", "InvalidImageUrl", "InvalidImage", "InvalidImageDimension", "UnsupportedImage"}
)
_TOO_LARGE_CODES = frozenset({"InvalidImageSize", "ImageTooLarge"})

_STATUS_KINDS = {
    400: ErrorKind.BAD_REQUEST,
    401: ErrorKind.UNAUTHORIZED,
    403: ErrorKind.FORBIDDEN,
    408: ErrorKind.TIMEOUT,
    429: ErrorKind.THROTTLED,
    500: ErrorKind.SERVER,
    502: ErrorKind.UNAVAILABLE,
    503: ErrorKind.UNAVAILABLE,
    # A gateway that gave up waiting for the backend: the same as gRPC's DEADLINE_EXCEEDED, so TIMEOUT
    # (retried like UNAVAILABLE; only the per-kind counts differ).
    504: ErrorKind.TIMEOUT,
}

_MAX_MESSAGE = 500


class AzureVisionProvider:
    """Azure AI Vision Image Analysis 4.0 behind the `Provider` protocol (see `visionroute.vision.base`)."""

    name = "azure"
    api_version = API_VERSION
    max_batch = 1
    max_image_bytes = 20 * 1024 * 1024  # the service's documented 20 MB limit on the image file
    formats = frozenset({"JPEG", "PNG", "GIF", "BMP", "WEBP", "ICO", "TIFF", "MPO"})
    # Standard (S1) tier: 10 transactions/s. The free F0 tier allows 20/min; set a lower quota for it.
    default_quota = Quota(requests_per_s=10.0)

    def __init__(self, endpoint: str, credential: AzureKeyCredential, *, timeout_s: float = 30.0) -> None:
        """Build the SDK client. Prefer `create_azure_provider`, which reads the environment."""
        self.endpoint = endpoint.rstrip("/")  # the SDK appends "/computervision" as is
        self.timeout_s = timeout_s
        self._credential = credential
        self._client = ImageAnalysisClient(
            self.endpoint,
            credential,
            api_version=API_VERSION,
            # Our runner retries with its own policy and rate limiter; the SDK's RetryPolicy would otherwise
            # retry this POST on 500/503/504 and on any answer carrying Retry-After (sleeping it out).
            retry_total=0,
            connection_timeout=timeout_s,
            read_timeout=timeout_s,
        )

    def __repr__(self) -> str:
        return f"AzureVisionProvider(endpoint={self.endpoint!r}, timeout_s={self.timeout_s})"

    def features(self) -> frozenset[str]:
        """tag, ocr and detect_objects; never detect_faces."""
        return frozenset(_FEATURES)

    def annotate(self, images: list[ImageInput], feature: str) -> list[Annotation | ImageError]:
        """One `analyze` call for the (single) image; per-image failures come back as ImageError."""
        if feature not in _FEATURES:
            raise ApiError(ErrorKind.UNSUPPORTED_FEATURE, f"azure does not serve {feature!r}")
        if len(images) > self.max_batch:
            raise ValueError(f"azure takes {self.max_batch} image per request, got {len(images)}")
        results: list[Annotation | ImageError] = []
        for image in images:
            failure: ApiError | None = None
            try:
                result = self._client.analyze(image_data=image.data, visual_features=[_FEATURES[feature]])
            except AzureError as error:
                failure = self._api_error(error)
            except ValueError as error:  # a 200 whose body is not the JSON the SDK expects
                failure = ApiError(ErrorKind.SERVER, self._scrub(f"unreadable answer from Azure: {error}"))
            # Raised out here, not inside `except`, so the ApiError does not chain the SDK exception, which
            # holds the request and its headers (the key among them).
            if failure is not None:
                if failure.kind not in (ErrorKind.INVALID_IMAGE, ErrorKind.TOO_LARGE):
                    raise failure
                results.append(ImageError(failure.kind, failure.message))
                continue
            results.append(_normalise(result, feature, image))
        return results

    def close(self) -> None:
        """Close the SDK's HTTP session."""
        self._client.close()

    def __enter__(self) -> AzureVisionProvider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- errors ---------------------------------------------------------------------------------------
    def _api_error(self, error: AzureError) -> ApiError:
        if isinstance(error, HttpResponseError) and error.status_code:
            return self._http_error(error)
        if isinstance(error, (ServiceRequestTimeoutError, ServiceResponseTimeoutError)):
            return ApiError(
                ErrorKind.TIMEOUT, self._scrub(f"no answer from Azure within {self.timeout_s:g}s")
            )
        if isinstance(error, (ServiceRequestError, ServiceResponseError)):
            # Connection refused/reset, DNS, TLS: the service (or the way to it) is not there right now.
            return ApiError(
                ErrorKind.UNAVAILABLE, self._scrub(f"cannot reach {self.endpoint}: {_first_line(error)}")
            )
        return ApiError(ErrorKind.SERVER, self._scrub(f"{type(error).__name__}: {_first_line(error)}"))

    def _http_error(self, error: HttpResponseError) -> ApiError:
        status = int(error.status_code or 0)
        code, message = _error_code_and_message(error)
        text = self._scrub(f"HTTP {status} {code or error.reason or ''}: {message}".strip())[:_MAX_MESSAGE]
        if status == 400 or status == 413:
            if code in _INVALID_IMAGE_CODES:
                return ApiError(ErrorKind.INVALID_IMAGE, text, status=status)
            if code in _TOO_LARGE_CODES or status == 413:
                return ApiError(ErrorKind.TOO_LARGE, text, status=status)
        if status == 404:  # the path, not the image: almost always a wrong endpoint
            text += f" (check {ENDPOINT_ENV} / the spec's endpoint: {self.endpoint})"
        kind = _STATUS_KINDS.get(status)
        if kind is None:
            kind = ErrorKind.SERVER if status >= 500 else ErrorKind.BAD_REQUEST
        retry_after = _retry_after(error) if kind in ErrorKind.RETRYABLE else None
        return ApiError(kind, text, status=status, retry_after=retry_after)

    def _scrub(self, text: str) -> str:
        """Belt and braces: Azure never echoes the key, but a proxy or a future SDK might."""
        key = self._credential.key
        return text.replace(key, "***") if key else text


@register_provider("azure")
def create_azure_provider(settings: ProviderSettings) -> AzureVisionProvider:
    """Build the provider from `settings.endpoint` or VISION_ENDPOINT, and VISION_KEY; raises
    ProviderConfigError naming the variable that is missing."""
    endpoint = settings.endpoint or os.environ.get(ENDPOINT_ENV, "").strip()
    key = os.environ.get(KEY_ENV, "").strip()
    hints = {
        ENDPOINT_ENV: "the Azure AI Vision resource's endpoint, https://<resource>.cognitiveservices.azure.com "
        "(or the spec's vision_api endpoint:)",
        KEY_ENV: "one of the resource's keys",
    }
    missing = [name for name, value in ((ENDPOINT_ENV, endpoint), (KEY_ENV, key)) if not value]
    if missing:
        raise ProviderConfigError(
            "azure provider: set " + " and ".join(f"{name} ({hints[name]})" for name in missing)
        )
    if not endpoint.startswith(("https://", "http://")):
        raise ProviderConfigError(
            f"azure provider: {ENDPOINT_ENV} / endpoint must start with https:// (http:// for a local "
            f"service), got {endpoint!r}"
        )
    return AzureVisionProvider(endpoint, AzureKeyCredential(key), timeout_s=settings.timeout_s)


# ---- normalisation --------------------------------------------------------------------------------------
def _normalise(result: ImageAnalysisResult, feature: str, image: ImageInput) -> Annotation:
    # The service reports the size it analysed; fall back to ours if it left it out.
    metadata = result.metadata
    width = (metadata.width if metadata and metadata.width else 0) or image.width or 1
    height = (metadata.height if metadata and metadata.height else 0) or image.height or 1
    annotation = Annotation()
    if feature == "tag" and result.tags is not None:
        tags = sorted(result.tags.list, key=lambda tag: tag.confidence, reverse=True)
        annotation.labels = [{"name": tag.name, "score": _score(tag.confidence)} for tag in tags]
    elif feature == "ocr" and result.read is not None:
        for block in result.read.blocks:
            for line in block.lines:
                points = [(point.x, point.y) for point in line.bounding_polygon]
                # Lines carry no confidence of their own; their words do.
                confidences = [word.confidence for word in line.words or [] if word.confidence is not None]
                score = _score(sum(confidences) / len(confidences)) if confidences else None
                annotation.text.append(
                    {"text": line.text, "box": box_from_points(points, width, height), "score": score}
                )
    elif feature == "detect_objects" and result.objects is not None:
        for detected in result.objects.list:
            best = max(detected.tags, key=lambda tag: tag.confidence) if detected.tags else None
            box = detected.bounding_box
            annotation.objects.append(
                {
                    "name": best.name if best else "object",
                    "score": _score(best.confidence) if best else 0.0,
                    "box": clamp_box(box.x / width, box.y / height, box.width / width, box.height / height),
                }
            )
    return annotation


def _score(value: float) -> float:
    return round(min(max(float(value), 0.0), 1.0), 5)


def _error_code_and_message(error: HttpResponseError) -> tuple[str | None, str]:
    """Azure's error code (the inner one when the outer is the generic InvalidRequest) and message."""
    odata = error.error
    if odata is None:
        return None, (error.reason or "no error body")
    code, message = odata.code, odata.message or ""
    inner = odata.innererror if isinstance(odata.innererror, dict) else {}
    if inner.get("code"):
        code, message = inner["code"], inner.get("message") or message
    return code, message


def _retry_after(error: HttpResponseError) -> float | None:
    """Retry-After in seconds (delta or HTTP date), or Azure's retry-after-ms variants."""
    headers: Any = error.response.headers if error.response is not None else {}
    for name, scale in (("Retry-After", 1.0), ("retry-after-ms", 1e-3), ("x-ms-retry-after-ms", 1e-3)):
        value = headers.get(name)
        if not value:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                continue
            return max(0.0, when.timestamp() - time.time())
    return None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:_MAX_MESSAGE]
