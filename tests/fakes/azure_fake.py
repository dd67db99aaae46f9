"""A local Azure AI Vision Image Analysis 4.0 service: the REST wire protocol the real SDK speaks.

`POST /computervision/imageanalysis:analyze?api-version=2023-10-01&features=tags,read,objects` with the image
as an application/octet-stream body and the key in `Ocp-Apim-Subscription-Key`. Answers come from
`behaviour.describe(data)` in the service's JSON shape; failures from `FakeBehaviour.judge` become Azure's
error JSON with the status the live service uses.
"""

from __future__ import annotations

import json
import threading
import time
from urllib.parse import parse_qs, urlsplit

from fakes.behaviour import FakeBehaviour, describe
from fakes.http_fake import FakeHandler, HttpFake

ANALYZE_PATH = "/computervision/imageanalysis:analyze"
API_VERSIONS = frozenset({"2023-10-01"})
FEATURES = frozenset({"tags", "read", "objects", "caption", "denseCaptions", "smartCrops", "people"})
MODEL_VERSION = "2023-10-01"

# (status, code, message) per failure kind, as the live service (or its API Management front) sends them.
# On the live service image problems are code InvalidRequest with the reason in innererror.code.
_FAILURES: dict[str, tuple[int, str, str]] = {
    "throttled": (429, "429", "Rate limit is exceeded. Try again in {retry_after} seconds."),
    "unavailable": (503, "ServiceUnavailable", "The service is temporarily unavailable."),
    "server_error": (500, "InternalServerError", "An unexpected error occurred."),
    "bad_request": (400, "InvalidRequest", "The request is not valid."),
    "invalid_image": (400, "InvalidImageFormat", "Input data is not a valid image."),
    "too_large": (400, "InvalidImageSize", "The input image is too large."),
    "unsupported_format": (400, "InvalidImageFormat", "Input image format is not supported."),
    "forbidden": (403, "403", "Out of call volume quota for this resource."),
    "unauthorized": (
        401,
        "401",
        "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid "
        "key for an active subscription and use a correct regional API endpoint for your resource.",
    ),
}
_IMAGE_CODES = frozenset({"InvalidImageFormat", "InvalidImageSize"})


class _Handler(FakeHandler):
    @property
    def fake(self) -> AzureVisionFake:
        """The AzureVisionFake this request reached."""
        return self.server.fake

    def do_GET(self) -> None:
        self._drain()
        self._count()
        self._send_json(404, {"error": {"code": "404", "message": "Resource not found"}})

    def do_POST(self) -> None:
        data = self._drain()
        self._count()
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path != ANALYZE_PATH:
            self._send_json(404, {"error": {"code": "404", "message": "Resource not found"}})
            return
        if self.headers.get("Ocp-Apim-Subscription-Key") != self.fake.key:
            self._send_error_kind("unauthorized")
            return
        api_version = (query.get("api-version") or [""])[0]
        if api_version not in API_VERSIONS:
            self._send_json(
                400,
                {
                    "error": {
                        "code": "InvalidRequest",
                        "message": f"Unsupported api-version {api_version!r}",
                        "innererror": {"code": "UnsupportedApiVersion", "message": api_version},
                    }
                },
            )
            return
        features = [item for value in query.get("features", []) for item in value.split(",") if item]
        if not features or not set(features) <= FEATURES:
            self._send_json(
                400,
                {
                    "error": {
                        "code": "InvalidRequest",
                        "message": f"Invalid visual features {features!r}",
                        "innererror": {"code": "NotSupportedVisualFeature", "message": str(features)},
                    }
                },
            )
            return
        if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/octet-stream":
            self._send_json(415, {"error": {"code": "InvalidRequest", "message": "Unsupported media type"}})
            return

        behaviour = self.fake.behaviour
        verdict = behaviour.judge([data], headers=dict(self.headers.items()))
        # Sleep outside every lock, so concurrent requests overlap as they do against the service.
        delay = behaviour.latency_s + verdict.hang_s
        if delay > 0:
            time.sleep(delay)
        if verdict.failure is not None:
            self._send_error_kind(verdict.failure, verdict.retry_after)
            return
        image_failure = verdict.image_failures[0] if verdict.image_failures else None
        if image_failure is not None:
            # One image per request: an image's failure is the request's, as on the service.
            self._send_error_kind(image_failure)
            return
        try:
            body = analysis_result(data, features)
        except Exception:  # PIL could not decode the body: what the service calls InvalidImageFormat
            self._send_error_kind("invalid_image")
            return
        self._send_json(200, body)

    # ---- helpers --------------------------------------------------------------------------------------
    def _drain(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _count(self) -> None:
        with self.fake._lock:
            self.fake.http_requests += 1
            self.fake.paths.append(self.path)

    def _send_error_kind(self, kind: str, retry_after: float | None = None) -> None:
        status, body = self.fake.error_body(kind, retry_after)
        headers = {"Retry-After": _retry_after_value(retry_after)} if status == 429 else {}
        self._send_json(status, body, headers)

    def _send_json(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        payload = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("apim-request-id", "00000000-0000-0000-0000-000000000000")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout was shorter than our hang)


class AzureVisionFake(HttpFake):
    """A ThreadingHTTPServer on 127.0.0.1 (an OS-chosen port) speaking Image Analysis 4.0; its `endpoint` is
    what VISION_ENDPOINT should be set to.

    `nested_errors=True` (the default) puts image error codes in `error.innererror.code` under
    `InvalidRequest`, as the live service does; False sends them as `error.code` directly.
    """

    handler_class = _Handler
    thread_name = "azure-fake"

    def __init__(
        self,
        behaviour: FakeBehaviour | None = None,
        *,
        key: str = "fake-azure-key",
        nested_errors: bool = True,
    ) -> None:
        super().__init__()
        self.behaviour = behaviour or FakeBehaviour(max_batch=1)
        self._key = key
        self.nested_errors = nested_errors
        self.http_requests = 0
        """Every HTTP request that reached the server, authenticated or not (judge counts only the former)."""
        self.paths: list[str] = []
        self._lock = threading.Lock()

    @property
    def key(self) -> str:
        """The subscription key requests must carry."""
        return self._key

    # ---- answers ----------------------------------------------------------------------------------------
    def error_body(self, kind: str, retry_after: float | None = None) -> tuple[int, dict]:
        """Azure's `{"error": {...}}` for one failure kind, and its status."""
        status, code, message = _FAILURES[kind]
        message = message.format(retry_after=_retry_after_value(retry_after))
        if code in _IMAGE_CODES and self.nested_errors:
            return status, {
                "error": {
                    "code": "InvalidRequest",
                    "message": message,
                    "innererror": {"code": code, "message": message},
                }
            }
        return status, {"error": {"code": code, "message": message}}


def analysis_result(data: bytes, features: list[str]) -> dict:
    """Image Analysis 4.0's ImageAnalysisResult JSON for `describe(data)`, only the requested features."""
    facts = describe(data)
    body: dict = {
        "modelVersion": MODEL_VERSION,
        "metadata": {"width": facts["width"], "height": facts["height"]},
    }
    if "tags" in features:
        body["tagsResult"] = {
            "values": [{"name": name, "confidence": score} for name, score in facts["labels"]]
        }
    if "read" in features:
        lines = []
        for text, (x, y, w, h) in facts["text"]:
            polygon = [
                {"x": round(px), "y": round(py)}
                for px, py in ((x, y), (x + w, y), (x + w, y + h), (x, y + h))
            ]
            words = [{"text": word, "boundingPolygon": polygon, "confidence": 0.99} for word in text.split()]
            lines.append({"text": text, "boundingPolygon": polygon, "words": words})
        body["readResult"] = {"blocks": [{"lines": lines}] if lines else []}
    if "objects" in features:
        body["objectsResult"] = {
            "values": [
                {
                    "boundingBox": {"x": round(x), "y": round(y), "w": round(w), "h": round(h)},
                    "tags": [{"name": name, "confidence": score}],
                }
                for name, score, (x, y, w, h) in facts["objects"]
            ]
        }
    return body


def _retry_after_value(retry_after: float | None) -> str:
    value = 1 if retry_after is None else retry_after
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
