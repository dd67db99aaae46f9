"""Annotate many images with one provider at the quota's speed: the one place that batches, rate-limits,
retries, caches and counts. Providers only speak their protocol (visionroute.vision.base).

How fast: concurrency is sized by Little's law, workers = request rate allowed x request latency, with the
latency measured on the first request. How safe: only retryable failures are retried (backoff with full jitter,
a deadline), a batch resends only the images that failed, a server's Retry-After holds back every worker, and
every image ends as one row (an answer or an error with its kind): nothing is lost silently.
"""

from __future__ import annotations

import hashlib
import io
import math
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from visionroute.data.images import ImageRejected, load_rgb, read_header
from visionroute.vision.base import Annotation, ApiError, ErrorKind, ImageError, ImageInput, Provider, Quota
from visionroute.vision.cache import ResultCache
from visionroute.vision.ratelimit import Limiter
from visionroute.vision.retry import RetryPolicy

MAX_WORKERS = 64
CHUNK = 256
"""Images read and looked up in the cache at a time: memory stays bounded on 200k-image jobs."""


@dataclass
class RunStats:
    provider: str
    feature: str
    images: int = 0
    requests: int = 0
    images_sent: int = 0
    billed_units: int = 0
    cache_hits: int = 0
    answered: int = 0
    retries: int = 0
    throttled_responses: int = 0
    errors_by_kind: Counter = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    concurrency: int = 1
    wall_s: float = 0.0

    def metrics(self) -> dict:
        """Flat numbers for MLflow and the Prefect UI."""
        latencies = np.array(self.latencies_s) if self.latencies_s else np.zeros(1)
        fresh = self.answered - self.cache_hits
        return {
            "images": self.images,
            "answered": self.answered,
            "errors": sum(self.errors_by_kind.values()),
            "requests": self.requests,
            "images_sent": self.images_sent,
            "billed_units": self.billed_units,
            "cache_hits": self.cache_hits,
            "retries": self.retries,
            "throttled_responses": self.throttled_responses,
            "latency_p50_s": round(float(np.percentile(latencies, 50)), 4),
            "latency_p95_s": round(float(np.percentile(latencies, 95)), 4),
            "images_per_s": round(fresh / self.wall_s, 3) if self.wall_s else 0.0,
            "concurrency": self.concurrency,
            "wall_s": round(self.wall_s, 3),
            **{f"errors_{kind}": count for kind, count in sorted(self.errors_by_kind.items())},
        }


def _error_row(path: str, sha256: str | None, kind: str, message: str) -> dict:
    return {"path": path, "sha256": sha256, "error": {"kind": kind, "message": message}}


def _fit_size(image: Image.Image, limit: int) -> bytes:
    """Re-encode as JPEG, shrinking until it fits `limit` bytes: boxes are fractions, so they still hold."""
    scale = 1.0
    for _ in range(6):
        size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
        buffer = io.BytesIO()
        image.resize(size).save(buffer, "JPEG", quality=90)
        if buffer.tell() <= limit:
            return buffer.getvalue()
        scale *= 0.9 * math.sqrt(limit / buffer.tell())
    raise ImageRejected(f"could not be shrunk under {limit:,} bytes")


def prepare(path: str, provider: Provider) -> ImageInput | dict:
    """Read one file as the provider must receive it, or an error row saying why it cannot be sent.
    The sha256 is the file's own, so the cache recognises the file however it was re-encoded."""
    try:
        data = Path(path).read_bytes()
        sha256 = hashlib.sha256(data).hexdigest()
    except OSError as error:
        return _error_row(path, None, ErrorKind.UNREADABLE, f"cannot read: {error.strerror or error}")
    try:
        fmt, _mode, (width, height) = read_header(Path(path))
        limit = provider.max_image_bytes
        if (provider.formats is not None and fmt not in provider.formats) or (limit and len(data) > limit):
            image = load_rgb(Path(path))
            if limit and len(data) > limit:
                data = _fit_size(image, limit)
                fmt = "JPEG"
            else:
                buffer = io.BytesIO()
                image.save(buffer, "PNG")
                data, fmt = buffer.getvalue(), "PNG"
            # Pixel boxes come back in the sent image's frame (shrunk, EXIF-rotated): normalise by its size.
            with Image.open(io.BytesIO(data)) as sent:
                width, height = sent.size
    except ImageRejected as error:
        return _error_row(path, sha256, ErrorKind.UNREADABLE, str(error))
    return ImageInput(path, sha256, data, width, height, fmt)


class _Run:
    """One annotation job's shared state: counters and the row sink, behind one lock."""

    def __init__(
        self,
        provider: Provider,
        feature: str,
        cache: ResultCache | None,
        cache_feature: str,
        limiter: Limiter,
        policy: RetryPolicy,
        emit: Callable[[dict], None],
        on_progress: Callable[[int, int], None] | None,
        total: int,
        seed: int,
    ) -> None:
        self.provider, self.feature, self.cache, self.cache_feature = provider, feature, cache, cache_feature
        self.limiter, self.policy, self._emit, self.on_progress = limiter, policy, emit, on_progress
        self.stats = RunStats(provider.name, feature, images=total)
        self.lock = threading.Lock()
        self.done = 0
        self.first_path: dict[str, str] = {}  # sha256 -> the path sent for those bytes
        self.outcomes: dict[str, dict] = {}  # sha256 -> its settled answer or error
        self.followers: dict[str, list[str]] = {}  # sha256 -> paths waiting on the answer
        self.refused: ApiError | None = None  # a 401/403 on a whole request: the rest are not sent
        self.rng = random.Random(seed)
        self.billed = int(getattr(provider, "billed", True))  # the on-premises provider bills nothing

    def emit(self, row: dict, cached: bool = False) -> None:
        row.setdefault("provider", self.provider.name)
        row.setdefault("feature", self.feature)
        row.setdefault("error", None)
        row["cached"] = cached
        with self.lock:
            if row["error"]:
                self.stats.errors_by_kind[row["error"]["kind"]] += 1
            else:
                self.stats.answered += 1
                self.stats.cache_hits += cached
            self.done += 1
            self._emit(row)
            done = self.done
        if self.on_progress:
            self.on_progress(done, self.stats.images)

    def answer(self, image: ImageInput, annotation: Annotation, latency: float, attempts: int) -> None:
        if self.cache is not None:
            self.cache.put(
                self.provider.name, self.cache_feature, self.provider.api_version, image.sha256, annotation
            )
        with self.lock:
            self.stats.billed_units += self.billed
        self._settle(image, {**annotation.to_dict(), "latency_s": round(latency, 4), "attempts": attempts})

    def fail(self, image: ImageInput, kind: str, message: str, attempts: int) -> None:
        self._settle(image, {**_error_row(image.path, image.sha256, kind, message), "attempts": attempts})

    def _settle(self, image: ImageInput, outcome: dict) -> None:
        """Emit the outcome for `image` and for every other file with the same bytes that waited on it."""
        self.emit({**outcome, "path": image.path, "sha256": image.sha256})
        with self.lock:
            self.outcomes[image.sha256] = outcome
            waiting = self.followers.pop(image.sha256, [])
        for path in waiting:
            self.emit({**outcome, "path": path, "sha256": image.sha256, "duplicate_of": image.path})

    def claim(self, image: ImageInput) -> bool:
        """True when `image` should be sent. Identical bytes under another path are sent once: the later
        files get the first one's answer (or error) and are not billed again."""
        with self.lock:
            if image.sha256 not in self.first_path:
                self.first_path[image.sha256] = image.path
                return True
            outcome = self.outcomes.get(image.sha256)
            if outcome is None:
                self.followers.setdefault(image.sha256, []).append(image.path)
                return False
        self.emit(
            {
                **outcome,
                "path": image.path,
                "sha256": image.sha256,
                "duplicate_of": self.first_path[image.sha256],
            }
        )
        return False

    def send(self, batch: list[ImageInput]) -> float | None:
        """Send one batch until every image has an answer or a final error; returns the first latency."""
        first_sent = time.monotonic()
        attempt, first_latency = 0, None
        while batch:
            attempt += 1
            if self.refused is not None:  # the credential was refused: sending the rest would only fail too
                for image in batch:
                    self.fail(image, self.refused.kind, f"not sent: {self.refused.message}", 0)
                return first_latency
            self.limiter.acquire(1, len(batch))
            started = time.monotonic()
            try:
                outcome = self.provider.annotate(batch, self.feature)
                failure = None
            except ApiError as error:
                outcome, failure = None, error
            except (
                Exception
            ) as error:  # an SDK failure the provider did not map: record it, keep the job going
                outcome = None
                failure = ApiError(ErrorKind.CLIENT, f"{type(error).__name__}: {str(error)[:300]}")
            latency = time.monotonic() - started
            first_latency = latency if first_latency is None else first_latency
            with self.lock:
                self.stats.requests += 1
                self.stats.images_sent += len(batch)
                self.stats.latencies_s.append(latency)
            if failure is not None:
                retry = [(image, failure.kind, failure.message) for image in batch]
                retry_after = failure.retry_after
                if failure.kind in (ErrorKind.UNAUTHORIZED, ErrorKind.FORBIDDEN):
                    self.refused = failure
            else:
                retry, retry_after = [], None
                for image, result in zip(batch, outcome, strict=True):
                    if isinstance(result, ImageError):
                        retry.append((image, result.kind, result.message))
                    else:
                        self.answer(image, result, latency, attempt)
            if any(item[1] == ErrorKind.THROTTLED for item in retry):
                with self.lock:
                    self.stats.throttled_responses += 1
            retryable = [item for item in retry if item[1] in ErrorKind.RETRYABLE]
            for image, kind, message in retry:
                if kind not in ErrorKind.RETRYABLE:
                    self.fail(image, kind, message, attempt)
            if not retryable:
                return first_latency
            with self.lock:
                wait = self.policy.delay(attempt, self.rng, retry_after)
            if not self.policy.allows(attempt, time.monotonic() - first_sent, wait):
                for image, kind, message in retryable:
                    self.fail(image, kind, f"{message} (gave up after {attempt} attempt(s))", attempt)
                return first_latency
            if retry_after:
                # The server is over quota for every caller: hold the other workers back too, but only when
                # this request will wait it out (a Retry-After past the deadline fails it instead, above).
                self.limiter.pause(retry_after)
            with self.lock:
                self.stats.retries += 1
            time.sleep(wait)
            batch = [image for image, _kind, _message in retryable]  # resend only what failed
        return first_latency


def concurrency_for(limiter_quota: Quota | None, latency_s: float, batch: int) -> int:
    """Little's law: requests in flight = request rate x latency. The rate is the tighter of the request
    quota and the unit quota divided by the batch size; 50% headroom absorbs latency jitter."""
    rates = []
    if limiter_quota and limiter_quota.requests_per_s:
        rates.append(limiter_quota.requests_per_s)
    if limiter_quota and limiter_quota.units_per_s:
        rates.append(limiter_quota.units_per_s / max(1, batch))
    if not rates:
        return 1  # no quota: the on-premises provider, bound by this machine, not by waiting
    return max(1, min(MAX_WORKERS, math.ceil(min(rates) * latency_s * 1.5) + 1))


def annotate_images(
    paths: Iterable[str],
    provider: Provider,
    feature: str,
    *,
    limiter: Limiter,
    cache: ResultCache | None = None,
    cache_feature: str | None = None,
    policy: RetryPolicy | None = None,
    emit: Callable[[dict], None],
    on_progress: Callable[[int, int], None] | None = None,
    concurrency: int | None = None,
    seed: int = 0,
) -> RunStats:
    """Annotate every image in `paths`; `emit` receives one row per image (in completion order)."""
    if feature not in provider.features():
        missing = getattr(provider, "missing", lambda _feature: None)(feature)
        raise ApiError(
            ErrorKind.UNSUPPORTED_FEATURE,
            missing
            or f"provider '{provider.name}' does not offer '{feature}' (it offers "
            f"{', '.join(sorted(provider.features()))}); choose another provider in vision_api.provider",
        )
    paths = [str(path) for path in paths]
    run = _Run(
        provider,
        feature,
        cache,
        cache_feature or feature,
        limiter,
        policy or RetryPolicy(),
        emit,
        on_progress,
        len(paths),
        seed,
    )
    started = time.monotonic()
    work: queue.Queue = queue.Queue(maxsize=4 * MAX_WORKERS)
    workers: list[threading.Thread] = []

    crashed: list[BaseException] = []
    stopping = threading.Event()

    def worker() -> None:
        # A failure outside the API call (the sink's disk, the cache) stops the job; the worker keeps
        # draining the queue so the producer never blocks on a dead pool, and the error is raised below.
        # `stopping` (the producer itself failed or was interrupted) makes them drain without sending.
        while (batch := work.get()) is not None:
            if not crashed and not stopping.is_set():
                try:
                    run.send(batch)
                except Exception as error:
                    crashed.append(error)

    def dispatch(batch: list[ImageInput]) -> None:
        if not workers:  # the first request measures the latency that sizes the pool
            latency = run.send(batch) or 0.0
            count = concurrency or concurrency_for(limiter.local and limiter.local.quota, latency, len(batch))
            run.stats.concurrency = count
            for _ in range(count):
                thread = threading.Thread(target=worker, daemon=True)
                thread.start()
                workers.append(thread)
            return
        if crashed:
            raise crashed[0]
        work.put(batch)

    try:
        for start in range(0, len(paths), CHUNK):
            prepared = [prepare(path, provider) for path in paths[start : start + CHUNK]]
            ready = [item for item in prepared if isinstance(item, ImageInput)]
            for row in prepared:
                if isinstance(row, dict):
                    run.emit(row)
            hits = (
                cache.get_many(
                    provider.name, run.cache_feature, provider.api_version, [i.sha256 for i in ready]
                )
                if cache is not None
                else {}
            )
            pending = []
            for image in ready:
                if image.sha256 in hits:
                    run.emit(
                        {"path": image.path, "sha256": image.sha256, **hits[image.sha256].to_dict()},
                        cached=True,
                    )
                elif run.claim(image):
                    pending.append(image)
            for index in range(0, len(pending), provider.max_batch):
                dispatch(pending[index : index + provider.max_batch])
    except BaseException:
        stopping.set()  # Ctrl-C, a cancelled flow, a cache error: queued batches must not be sent (billed)
        raise
    finally:
        for _ in workers:
            work.put(None)
        for thread in workers:
            thread.join()
    if crashed:
        raise crashed[0]
    run.stats.wall_s = time.monotonic() - started
    return run.stats
