"""Amazon Rekognition as a Vision API provider: one image per call, boto3 over JSON 1.1.

botocore's own retries are switched off (`total_max_attempts: 1`): the shared runner retries with its own
policy and rate limiter, and two retry layers would multiply attempts and hide throttling from it.
Credentials come from the standard AWS chain (environment, shared files, SSO, container or instance role);
they are never read, logged or echoed by this module.
"""

from __future__ import annotations

import email.utils
import logging
import threading
import time
from typing import Any
from urllib.parse import urlparse

import boto3
import botocore.exceptions
from botocore.config import Config

from visionroute.vision.base import (
    Annotation,
    ApiError,
    ErrorKind,
    ImageError,
    ImageInput,
    ProviderConfigError,
    ProviderSettings,
    Quota,
    clamp_box,
    register_provider,
)

log = logging.getLogger(__name__)

_MAX_LABELS = 20
_MIN_CONFIDENCE = 50.0  # percent; AWS's own default is 55, a little lower keeps weak but useful tags
_BYTES_LIMIT = 5 * 1024 * 1024  # Image.Bytes: 5 MB of raw (not base64) bytes
_S3_LIMIT = 15 * 1024 * 1024  # Image.S3Object: 15 MB
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png"}

# Error codes as botocore reports them (the JSON `__type`, namespace stripped), by kind.
_CODE_KINDS = {
    "ThrottlingException": ErrorKind.THROTTLED,
    "ProvisionedThroughputExceededException": ErrorKind.THROTTLED,
    "LimitExceededException": ErrorKind.THROTTLED,
    "TooManyRequestsException": ErrorKind.THROTTLED,
    "SlowDown": ErrorKind.THROTTLED,  # S3
    "InternalServerError": ErrorKind.SERVER,
    "InternalFailure": ErrorKind.SERVER,
    "InternalError": ErrorKind.SERVER,  # S3
    "ServiceUnavailableException": ErrorKind.UNAVAILABLE,
    "ServiceUnavailable": ErrorKind.UNAVAILABLE,
    "RequestTimeout": ErrorKind.TIMEOUT,
    "RequestTimeoutException": ErrorKind.TIMEOUT,
    "InvalidImageFormatException": ErrorKind.INVALID_IMAGE,
    "ImageTooLargeException": ErrorKind.TOO_LARGE,
    "InvalidParameterException": ErrorKind.BAD_REQUEST,
    "ValidationException": ErrorKind.BAD_REQUEST,
    "InvalidS3ObjectException": ErrorKind.BAD_REQUEST,
    "NoSuchBucket": ErrorKind.BAD_REQUEST,
    "AccessDeniedException": ErrorKind.FORBIDDEN,
    "AccessDenied": ErrorKind.FORBIDDEN,  # S3
    "UnrecognizedClientException": ErrorKind.UNAUTHORIZED,
    "InvalidSignatureException": ErrorKind.UNAUTHORIZED,
    "SignatureDoesNotMatch": ErrorKind.UNAUTHORIZED,  # S3
    "InvalidAccessKeyId": ErrorKind.UNAUTHORIZED,  # S3
    "IncompleteSignatureException": ErrorKind.UNAUTHORIZED,
    "MissingAuthenticationTokenException": ErrorKind.UNAUTHORIZED,
    "ExpiredTokenException": ErrorKind.UNAUTHORIZED,
    "ExpiredToken": ErrorKind.UNAUTHORIZED,
}

# Failures that concern the one image sent, not the request: reported per image, like Google's batch errors.
_IMAGE_KINDS = frozenset({ErrorKind.INVALID_IMAGE, ErrorKind.TOO_LARGE, ErrorKind.UNSUPPORTED_FORMAT})

_OPERATIONS = {
    "tag": "detect_labels",
    "detect_objects": "detect_labels",
    "ocr": "detect_text",
    "detect_faces": "detect_faces",
}


def _kind_for_status(status: int | None) -> str:
    if status == 429:
        return ErrorKind.THROTTLED
    if status == 503:
        return ErrorKind.UNAVAILABLE
    if status == 408:
        return ErrorKind.TIMEOUT
    if status is not None and status >= 500:
        return ErrorKind.SERVER
    if status == 401:
        return ErrorKind.UNAUTHORIZED
    if status == 403:
        return ErrorKind.FORBIDDEN
    return ErrorKind.BAD_REQUEST


def _retry_after(headers: dict[str, str]) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None when absent or unreadable."""
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _ratio_box(box: dict[str, Any]) -> list[float]:
    """Rekognition's BoundingBox is already in ratios of the image; only clip what overshoots the edges."""
    return clamp_box(
        float(box.get("Left", 0.0)),
        float(box.get("Top", 0.0)),
        float(box.get("Width", 0.0)),
        float(box.get("Height", 0.0)),
    )


def _uses_aws_service_host(endpoint: str | None) -> bool:
    """A Rekognition-specific AWS host (regional, FIPS or VPC endpoint) cannot serve S3; a private or local
    endpoint (moto, LocalStack, a fake) serves every service on one port."""
    host = (urlparse(endpoint).hostname or "") if endpoint else ""
    return "rekognition" in host and host.endswith(("amazonaws.com", "amazonaws.com.cn"))


class RekognitionProvider:
    """Amazon Rekognition. Build it with `create_provider("aws", settings)` or directly; it creates its boto3
    clients once (boto3 clients are thread-safe, sessions are not) and may be shared by the runner's threads.
    """

    name = "aws"
    api_version = "2016-06-27"
    max_batch = 1
    formats: frozenset[str] | None = frozenset({"JPEG", "PNG"})
    default_quota = Quota(requests_per_s=10.0)

    def __init__(self, settings: ProviderSettings | None = None) -> None:
        self.settings = settings or ProviderSettings()
        try:
            session = boto3.Session(region_name=self.settings.region)
            credentials = session.get_credentials()
        except botocore.exceptions.ProfileNotFound as exc:
            raise ProviderConfigError(
                f"aws: {exc}; set AWS_PROFILE to a profile that exists in your AWS config, or unset it and set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise ProviderConfigError(f"aws: could not read the AWS credential chain ({exc})") from None
        if credentials is None:
            raise ProviderConfigError(
                "aws: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or another standard AWS credential source such as ~/.aws/credentials, SSO or an instance role)"
            )
        self._credentials = credentials
        self.region = self.settings.region or session.region_name or "us-east-1"
        self.bucket = self.settings.s3_bucket
        self.max_image_bytes: int | None = _S3_LIMIT if self.bucket else _BYTES_LIMIT
        timeout = float(self.settings.timeout_s)
        config = Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=min(timeout, 10.0),
            read_timeout=timeout,
            max_pool_connections=64,
            user_agent_extra="visionroute",
        )
        self._client = session.client(
            "rekognition", region_name=self.region, endpoint_url=self.settings.endpoint, config=config
        )
        self._s3 = None
        if self.bucket:
            s3_endpoint = None if _uses_aws_service_host(self.settings.endpoint) else self.settings.endpoint
            self._s3 = session.client("s3", region_name=self.region, endpoint_url=s3_endpoint, config=config)
        self._uploaded: set[str] = set()
        self._uploaded_lock = threading.Lock()
        self.uploads = 0
        """Objects this provider put into the bucket (not counting those already there)."""

    # ---- the Provider protocol --------------------------------------------------------------------------
    def features(self) -> frozenset[str]:
        """tag, detect_objects (label instances), ocr (text lines) and detect_faces."""
        return frozenset(_OPERATIONS)

    def annotate(self, images: list[ImageInput], feature: str) -> list[Annotation | ImageError]:
        """One Rekognition call for the one image; an image-specific failure comes back as `[ImageError]`,
        a failure of the request (throttling, 5xx, auth, network) raises ApiError."""
        if feature not in _OPERATIONS:
            raise ApiError(ErrorKind.UNSUPPORTED_FEATURE, f"aws does not offer {feature!r}")
        if not images:
            return []
        if len(images) > self.max_batch:
            raise ValueError(f"aws takes {self.max_batch} image per request, got {len(images)}")
        image = images[0]
        if image.format not in (self.formats or ()):
            return [
                ImageError(ErrorKind.UNSUPPORTED_FORMAT, f"Rekognition takes JPEG or PNG, not {image.format}")
            ]
        if self.max_image_bytes is not None and len(image.data) > self.max_image_bytes:
            return [
                ImageError(
                    ErrorKind.TOO_LARGE,
                    f"{len(image.data)} bytes is over Rekognition's {self.max_image_bytes}",
                )
            ]
        try:
            return [self._call(image, feature)]
        except ApiError as exc:
            if exc.kind in _IMAGE_KINDS:
                return [ImageError(exc.kind, exc.message)]
            raise

    # ---- internals ------------------------------------------------------------------------------------------
    def _call(self, image: ImageInput, feature: str) -> Annotation:
        request: dict[str, Any] = {"Image": self._image_argument(image)}
        operation = _OPERATIONS[feature]
        if operation == "detect_labels":
            request.update(MaxLabels=_MAX_LABELS, MinConfidence=_MIN_CONFIDENCE)
        elif operation == "detect_faces":
            request["Attributes"] = ["DEFAULT"]
        response = self._invoke(getattr(self._client, operation), **request)
        return self._normalise(feature, response)

    def _image_argument(self, image: ImageInput) -> dict[str, Any]:
        if self._s3 is None:
            return {"Bytes": image.data}
        key = f"visionroute/{image.sha256}.{_EXTENSIONS.get(image.format, 'bin')}"
        self._ensure_uploaded(key, image)
        return {"S3Object": {"Bucket": self.bucket, "Name": key}}

    def _ensure_uploaded(self, key: str, image: ImageInput) -> None:
        """Put the image once: skip it when this provider already did, or when head_object finds it (a
        previous run, another machine). Two threads racing on one key both put the same bytes: harmless."""
        assert self._s3 is not None
        with self._uploaded_lock:
            if key in self._uploaded:
                return
        try:
            self._invoke(self._s3.head_object, Bucket=self.bucket, Key=key)
        except ApiError as exc:
            # HEAD answers a missing key with a bare 404, or with 403 when the caller lacks s3:ListBucket:
            # either way, put it (a put-only role is enough; a real denial shows on the put).
            if exc.status not in (403, 404):
                raise
            content_type = "image/png" if image.format == "PNG" else "image/jpeg"
            self._invoke(
                self._s3.put_object, Bucket=self.bucket, Key=key, Body=image.data, ContentType=content_type
            )
            with self._uploaded_lock:
                self.uploads += 1
            log.debug("aws: uploaded %s to s3://%s/%s", image.path, self.bucket, key)
        with self._uploaded_lock:
            self._uploaded.add(key)

    def _invoke(self, method: Any, **kwargs: Any) -> dict[str, Any]:
        """Call one boto3 method, turning every botocore failure into ApiError."""
        try:
            return method(**kwargs)
        except botocore.exceptions.ClientError as exc:
            raise self._client_error(exc) from None
        # Timeouts first: ConnectTimeoutError is also a ConnectionError.
        except (botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectTimeoutError) as exc:
            raise ApiError(
                ErrorKind.TIMEOUT, f"no answer within the timeout ({type(exc).__name__})"
            ) from None
        except (
            botocore.exceptions.EndpointConnectionError,
            botocore.exceptions.ConnectionClosedError,
            botocore.exceptions.ConnectionError,
            botocore.exceptions.HTTPClientError,
        ) as exc:
            raise ApiError(ErrorKind.UNAVAILABLE, self._scrub(str(exc))) from None
        except botocore.exceptions.NoCredentialsError:
            raise ApiError(ErrorKind.UNAUTHORIZED, "the AWS credentials are no longer available") from None
        except botocore.exceptions.ParamValidationError as exc:
            raise ApiError(ErrorKind.BAD_REQUEST, self._scrub(str(exc))) from None

    def _client_error(self, exc: botocore.exceptions.ClientError) -> ApiError:
        error = exc.response.get("Error", {})
        metadata = exc.response.get("ResponseMetadata", {})
        code = str(error.get("Code") or "")
        status = metadata.get("HTTPStatusCode")
        kind = _CODE_KINDS.get(code) or _kind_for_status(status)
        message = self._scrub(f"{code}: {error.get('Message') or ''}".strip(": "))
        return ApiError(
            kind, message, status=status, retry_after=_retry_after(metadata.get("HTTPHeaders", {}))
        )

    def _scrub(self, message: str) -> str:
        """First line only (AWS's signature errors go on to quote the canonical request, which can carry a
        session token), at most 300 characters, and no credential value even if a server echoed one."""
        message = message.strip().splitlines()[0] if message.strip() else ""
        try:
            frozen = self._credentials.get_frozen_credentials()
            secrets = [frozen.access_key, frozen.secret_key, frozen.token]
        except Exception:  # a refresh failure must not hide the error being reported
            secrets = []
        for secret in secrets:
            if secret:
                message = message.replace(secret, "***")
        return message[:300]

    @staticmethod
    def _normalise(feature: str, response: dict[str, Any]) -> Annotation:
        annotation = Annotation()
        if feature == "tag":
            labels = [
                {"name": label["Name"], "score": round(float(label.get("Confidence", 0.0)) / 100.0, 5)}
                for label in response.get("Labels", [])
            ]
            annotation.labels = sorted(labels, key=lambda item: -item["score"])
        elif feature == "detect_objects":
            for label in response.get("Labels", []):
                for instance in label.get("Instances", []) or []:
                    if "BoundingBox" not in instance:
                        continue
                    score = instance.get("Confidence", label.get("Confidence", 0.0))
                    annotation.objects.append(
                        {
                            "name": label["Name"],
                            "score": round(float(score) / 100.0, 5),
                            "box": _ratio_box(instance["BoundingBox"]),
                        }
                    )
            annotation.objects.sort(key=lambda item: -item["score"])
        elif feature == "ocr":
            for detection in response.get("TextDetections", []):
                if detection.get("Type") != "LINE":
                    continue  # WORDs repeat the LINEs' text
                confidence = detection.get("Confidence")
                annotation.text.append(
                    {
                        "text": detection.get("DetectedText", ""),
                        "box": _ratio_box(detection.get("Geometry", {}).get("BoundingBox", {})),
                        "score": None if confidence is None else round(float(confidence) / 100.0, 5),
                    }
                )
        elif feature == "detect_faces":
            annotation.faces = [
                {
                    "score": round(float(face.get("Confidence", 0.0)) / 100.0, 5),
                    "box": _ratio_box(face["BoundingBox"]),
                }
                for face in response.get("FaceDetails", [])
                if "BoundingBox" in face
            ]
        return annotation


@register_provider("aws")
def create_aws_provider(settings: ProviderSettings) -> RekognitionProvider:
    """The `aws` provider; raises ProviderConfigError when no AWS credentials can be found."""
    return RekognitionProvider(settings)
