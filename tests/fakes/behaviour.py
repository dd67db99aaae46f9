"""What every local Vision API fake shares: deterministic answers, injected latency and failures, and a
server-side quota. Each fake (google_fake, aws_fake, azure_fake) speaks its provider's wire protocol and asks
this object what to do with each request.

Answers are derived from the image itself, so a test can predict them: the dominant colour channel gives the
top label ("Red", "Green" or "Blue", score 0.9) plus "Image" (0.5); OCR returns one line "TEXT <first 8 hex
of sha256>"; objects and faces return one box covering the image's centre quarter.
"""

from __future__ import annotations

import hashlib
import io
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

FAILURE_KINDS = (
    "throttled",
    "unavailable",
    "timeout",
    "server_error",
    "bad_request",
    "unauthorized",
    "forbidden",
    "invalid_image",
)


class ServerBucket:
    """The server's quota: a token bucket that starts full with one second of tokens (at least `minimum`)."""

    def __init__(self, rate_per_s: float | None, minimum: float = 1.0) -> None:
        self.rate = rate_per_s
        self.capacity = max(rate_per_s or 0.0, minimum)
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def has(self, amount: float) -> bool:
        if self.rate is None:
            return True
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return self.tokens + 1e-9 >= amount

    def take(self, amount: float) -> None:
        if self.rate is not None:
            self.tokens -= amount


@dataclass
class Verdict:
    """What the fake does with one request: fail it whole (`failure` set), or answer each image
    (`image_failures[i]` set for an image that fails inside the answer)."""

    failure: str | None = None
    retry_after: float | None = None
    hang_s: float = 0.0
    image_failures: list[str | None] = field(default_factory=list)


class FakeBehaviour:
    def __init__(
        self,
        *,
        latency_s: float = 0.0,
        requests_per_s: float | None = None,
        units_per_s: float | None = None,
        max_batch: int = 16,
        max_image_bytes: int | None = None,
        hang_s: float = 2.0,
    ) -> None:
        self.latency_s = latency_s
        self.max_batch = max_batch
        self.max_image_bytes = max_image_bytes
        self.hang_s = hang_s
        self._lock = threading.Lock()
        self._requests_bucket = ServerBucket(requests_per_s)
        self._units_bucket = ServerBucket(units_per_s, minimum=max_batch)
        self._scripted: list[tuple[str, float | None]] = []
        self._image_failures: dict[str, list] = {}
        self.requests = 0
        self.arrivals: list[float] = []
        """time.monotonic() of each request's arrival."""
        self.images_answered = 0
        self.throttled = 0
        self.failures_sent: dict[str, int] = {}
        self.headers_seen: list[dict] = []

    # ---- what a test sets up --------------------------------------------------------------------------
    def fail_next(self, count: int, kind: str, retry_after: float | None = None) -> None:
        """The next `count` requests fail whole with `kind` (one of FAILURE_KINDS); `timeout` hangs for
        `hang_s` and then answers, so a client with a shorter timeout gives up."""
        assert kind in FAILURE_KINDS, kind
        with self._lock:
            self._scripted += [(kind, retry_after)] * count

    def fail_image(self, sha256: str, kind: str, times: int = -1) -> None:
        """Requests containing this image fail for it (per image where the protocol allows, else whole),
        `times` times (-1: always)."""
        with self._lock:
            self._image_failures[sha256] = [kind, times]

    # ---- what a fake calls per request ----------------------------------------------------------------
    def judge(self, images: list[bytes], headers: dict | None = None) -> Verdict:
        """Count the request, apply the quota and the scripted failures. The caller sleeps `latency_s`
        (and `hang_s` for a timeout) itself, outside any lock."""
        with self._lock:
            self.requests += 1
            self.arrivals.append(time.monotonic())
            if headers is not None:
                self.headers_seen.append(dict(headers))
            if self._scripted:
                kind, retry_after = self._scripted.pop(0)
                self.failures_sent[kind] = self.failures_sent.get(kind, 0) + 1
                if kind == "timeout":
                    return Verdict(hang_s=self.hang_s, image_failures=[None] * len(images))
                return Verdict(failure=kind, retry_after=retry_after)
            if len(images) > self.max_batch:
                return Verdict(failure="bad_request")
            # Both buckets are checked before either is charged, as a real quota check is.
            if not (self._requests_bucket.has(1) and self._units_bucket.has(len(images))):
                self.throttled += 1
                return Verdict(failure="throttled", retry_after=1.0)
            self._requests_bucket.take(1)
            self._units_bucket.take(len(images))
            per_image: list[str | None] = []
            for data in images:
                per_image.append(self._image_failure(data))
            self.images_answered += sum(1 for item in per_image if item is None)
            return Verdict(image_failures=per_image)

    def _image_failure(self, data: bytes) -> str | None:
        if self.max_image_bytes is not None and len(data) > self.max_image_bytes:
            return "too_large"
        entry = self._image_failures.get(hashlib.sha256(data).hexdigest())
        if entry is None:
            return None
        kind, times = entry
        if times == 0:
            return None
        if times > 0:
            entry[1] -= 1
        self.failures_sent[kind] = self.failures_sent.get(kind, 0) + 1
        return kind


def describe(data: bytes) -> dict:
    """The deterministic answer for one image: labels, text, objects and faces, boxes in pixels (x, y, w, h)
    plus the image size, so each fake can express them in its provider's own convention."""
    with Image.open(io.BytesIO(data)) as image:
        rgb = np.asarray(image.convert("RGB").resize((16, 16)), dtype=np.float64)
        width, height = image.size
    means = rgb.reshape(-1, 3).mean(axis=0)
    colour = ("Red", "Green", "Blue")[int(np.argmax(means))]
    digest = hashlib.sha256(data).hexdigest()
    centre = (width / 4, height / 4, width / 2, height / 2)
    return {
        "width": width,
        "height": height,
        "labels": [(colour, 0.9), ("Image", 0.5)],
        "text": [(f"TEXT {digest[:8]}", centre)],
        "objects": [(colour, 0.8, centre)],
        "faces": [(0.95, centre)],
    }
