"""The one interface every Vision API provider implements, the normalised answer they all return, and the
provider registry.

A provider turns one request (a batch of at most `max_batch` images, one feature) into one normalised
`Annotation` or `ImageError` per image, in order. It knows its wire protocol and its error codes, nothing else:
rate limiting, retries, caching, concurrency and tracking live in `visionroute.vision.runner`, shared by all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

from visionroute.registry import Registry

FEATURES = ("tag", "ocr", "detect_objects", "detect_faces")
"""The generic tasks a provider may serve (the spec's task names)."""


class ErrorKind:
    """Stable error kinds, counted per run ("errors by kind") and used to decide what is retried."""

    THROTTLED = "throttled"  # 429, RESOURCE_EXHAUSTED, ThrottlingException: retried
    UNAVAILABLE = "unavailable"  # 503, UNAVAILABLE, connection refused/reset: retried
    TIMEOUT = "timeout"  # DEADLINE_EXCEEDED, 408, client-side timeout: retried
    SERVER = "server_error"  # other 5xx, INTERNAL: retried
    INVALID_IMAGE = "invalid_image"  # the service could not decode the image: never retried
    TOO_LARGE = "too_large"  # over the provider's size limit: never retried
    UNSUPPORTED_FORMAT = "unsupported_format"  # e.g. AWS accepts JPEG/PNG only: never retried
    BAD_REQUEST = "bad_request"  # 400, INVALID_ARGUMENT: never retried
    UNAUTHORIZED = "unauthorized"  # 401, UNAUTHENTICATED: never retried
    FORBIDDEN = "forbidden"  # 403, PERMISSION_DENIED: never retried
    UNSUPPORTED_FEATURE = "unsupported_feature"  # the provider does not offer this task: never retried
    UNREADABLE = "unreadable"  # our side: the file could not be read or decoded: never sent
    CLIENT = "client_error"  # our side: the SDK failed in a way the provider does not map: never retried

    RETRYABLE = frozenset({THROTTLED, UNAVAILABLE, TIMEOUT, SERVER})


@dataclass(frozen=True)
class ImageInput:
    """One image as it is sent: the encoded bytes (never re-encoded unless the provider must) and their facts."""

    path: str
    sha256: str
    data: bytes
    width: int
    height: int
    format: str
    """PIL's format name: JPEG, PNG, ..."""


@dataclass
class Annotation:
    """The normalised answer for one image. Boxes are [left, top, width, height] as fractions of the image's
    width and height (0..1), whatever the provider's own convention (pixels, normalised vertices, ratios)."""

    labels: list[dict] = field(default_factory=list)
    """{"name": str, "score": float 0..1}, best first."""
    text: list[dict] = field(default_factory=list)
    """{"text": str, "box": [l, t, w, h], "score": float | None}, one per line or block as the API gives."""
    objects: list[dict] = field(default_factory=list)
    """{"name": str, "score": float, "box": [l, t, w, h]}."""
    faces: list[dict] = field(default_factory=list)
    """{"score": float, "box": [l, t, w, h]}."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ImageError:
    """One image's failure inside an otherwise answered request (e.g. Google's per-image `response.error`)."""

    kind: str
    message: str

    @property
    def retryable(self) -> bool:
        return self.kind in ErrorKind.RETRYABLE


class ApiError(Exception):
    """The whole request failed. `retry_after` (seconds) is the server's Retry-After when it sent one."""

    def __init__(
        self, kind: str, message: str, *, status: int | str | None = None, retry_after: float | None = None
    ):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.status = status
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.kind in ErrorKind.RETRYABLE


class ProviderConfigError(ValueError):
    """The provider cannot be built: a missing credential or a bad setting; the message names what to set."""


@dataclass(frozen=True)
class Quota:
    """A provider's quota in its own units. None means no limit in that unit."""

    requests_per_s: float | None = None
    """Requests (API calls) per second; Google's default 1,800/min is 30/s, AWS and Azure 10/s by default."""
    units_per_s: float | None = None
    """Images x features per second (Google counts 1,800 images per feature per minute, however batched)."""


@dataclass(frozen=True)
class ProviderSettings:
    """What a user may set per provider (spec `vision_api:` block or CLI); credentials are never here: each
    SDK reads them from its standard places (environment, credential files)."""

    endpoint: str | None = None
    """Regional or private endpoint. `http://host:port` means plaintext (a private endpoint or a local fake)."""
    transport: str | None = None
    """google: grpc (default) or rest."""
    region: str | None = None
    """aws: the Rekognition region (default: the AWS chain's, else us-east-1)."""
    timeout_s: float = 30.0
    """Per-request timeout."""
    ocr_mode: str = "text"
    """google: text (TEXT_DETECTION) or document (DOCUMENT_TEXT_DETECTION)."""
    s3_bucket: str | None = None
    """aws: send images as S3 objects in this bucket (s3://bucket/<sha256>) instead of raw bytes."""


@runtime_checkable
class Provider(Protocol):
    name: str
    api_version: str
    """Part of the result cache key: a new API version's answers are not served from an old one's cache."""
    max_batch: int
    """Images per request (Google 16, others 1)."""
    max_image_bytes: int | None
    """Largest encoded image the API takes; bigger ones become ImageError(too_large) without a call."""
    formats: frozenset[str] | None
    """Encoded formats the API takes (PIL names), None for any; others are re-encoded to PNG or JPEG."""
    default_quota: Quota
    # Optional attribute `billed: bool` (default True): False for a provider whose answers cost nothing.

    def features(self) -> frozenset[str]:
        """Which of FEATURES this provider serves."""
        ...

    def annotate(self, images: list[ImageInput], feature: str) -> list[Annotation | ImageError]:
        """Send one request; one entry per image, in order. Raises ApiError when the whole request fails."""
        ...


_PROVIDERS: Registry[Provider] = Registry("Vision API provider")


def register_provider(name: str) -> Callable[[Callable[..., Provider]], Callable[..., Provider]]:
    """Decorate a factory `(settings: ProviderSettings) -> Provider`."""
    return _PROVIDERS.register(name)


BUILTIN_PROVIDERS = ("google", "aws", "azure", "local")


def _register_builtin() -> None:
    # Imported on first use: each pulls in its cloud SDK, which `visionroute decide` never needs.
    import importlib

    for name in BUILTIN_PROVIDERS:
        importlib.import_module(f"visionroute.vision.{name}")


def create_provider(name: str, settings: ProviderSettings | None = None) -> Provider:
    """Build a provider; raises ProviderConfigError naming what to set when a credential is missing."""
    _register_builtin()
    return _PROVIDERS.create(name, settings=settings or ProviderSettings())


def list_providers() -> list[str]:
    _register_builtin()
    return _PROVIDERS.names()


def clamp_box(left: float, top: float, width: float, height: float) -> list[float]:
    """A box in fractions of the image, clipped to the image and rounded (providers overshoot edges)."""
    left, top = min(max(left, 0.0), 1.0), min(max(top, 0.0), 1.0)
    width, height = min(max(width, 0.0), 1.0 - left), min(max(height, 0.0), 1.0 - top)
    return [round(left, 5), round(top, 5), round(width, 5), round(height, 5)]


def box_from_points(
    points: list[tuple[float, float]], width: float = 1.0, height: float = 1.0
) -> list[float]:
    """The enclosing box of polygon vertices given in pixels (pass the image size) or fractions (leave 1.0)."""
    if not points:
        return [0.0, 0.0, 0.0, 0.0]
    xs = [x / width for x, _ in points]
    ys = [y / height for _, y in points]
    return clamp_box(min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys))
