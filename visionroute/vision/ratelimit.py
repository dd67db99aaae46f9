"""Client-side quotas: a token bucket in the quota's own units, shared by every thread of this process, and
(when a Prefect server is configured) a Prefect global rate limit shared by every process.

A quota can have two units at once (Google: requests per minute AND images x features per minute); one
`acquire(requests, units)` waits until both buckets hold enough, then takes from both, so neither is exceeded.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time

from visionroute.vision.base import Quota

log = logging.getLogger(__name__)


BURST_S = 0.5
"""Seconds of quota a limiter lets through at once (see RateLimiter)."""


class _Bucket:
    """Tokens refill at `rate` per second up to `capacity`; the bucket starts full."""

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.stamp = time.monotonic()

    def refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` tokens are there (0 when they are)."""
        return max(0.0, (amount - self.tokens) / self.rate)


class RateLimiter:
    """Blocks callers so that requests and units stay within `quota`.

    `burst_s` sizes the buckets: half a second of quota by default. The server counts requests when they
    arrive, after network jitter has bunched some together; the half second the server allows beyond ours
    absorbs that, so the client never looks over quota. The steady rate, and so throughput, is the quota's.
    A bucket is never smaller than the largest single request (`max_units`), or a full batch could never go.
    """

    def __init__(self, quota: Quota, max_units: int = 1, burst_s: float = BURST_S) -> None:
        self.quota = quota
        self._buckets: list[tuple[_Bucket, str]] = []
        if quota.requests_per_s:
            self._buckets.append(
                (_Bucket(quota.requests_per_s, max(1.0, quota.requests_per_s * burst_s)), "r")
            )
        if quota.units_per_s:
            capacity = max(float(max_units), quota.units_per_s * burst_s)
            self._buckets.append((_Bucket(quota.units_per_s, capacity), "u"))
        self._lock = threading.Lock()
        self._paused_until = 0.0

    def acquire(self, requests: int = 1, units: int = 1) -> float:
        """Wait until one request of `units` fits the quota, take it, and return the seconds waited."""
        started, slept = time.monotonic(), False
        while True:
            with self._lock:
                now = time.monotonic()
                wait = self._paused_until - now
                for bucket, unit in self._buckets:
                    bucket.refill(now)
                    wait = max(wait, bucket.wait_for(requests if unit == "r" else units))
                if wait <= 0:
                    for bucket, unit in self._buckets:
                        bucket.tokens -= requests if unit == "r" else units
                    return now - started if slept else 0.0
            time.sleep(min(wait, 1.0))
            slept = True

    def pause(self, seconds: float) -> None:
        """Hold every caller back for `seconds` (the server said Retry-After: it is over quota for all)."""
        with self._lock:
            self._paused_until = max(self._paused_until, time.monotonic() + seconds)


_SHARED: dict[tuple, RateLimiter] = {}
_SHARED_LOCK = threading.Lock()


def shared_limiter(key: str, quota: Quota, max_units: int = 1) -> RateLimiter:
    """The one limiter of this process for `key` (provider and endpoint) and quota: concurrent tasks and
    flows in one process that call the same API share its quota instead of each assuming all of it."""
    with _SHARED_LOCK:
        limiter = _SHARED.get((key, quota))
        if limiter is None:
            limiter = _SHARED[(key, quota)] = RateLimiter(quota, max_units)
        return limiter


class PrefectRateLimit:
    """The same quota as Prefect global concurrency limits with slot decay, so that several processes
    (workers, schedules) calling one API stay within it together. Used only when a Prefect server is
    configured (PREFECT_API_URL); ephemeral mode has no shared server to count on."""

    def __init__(self, key: str, quota: Quota, max_units: int = 1, burst_s: float = BURST_S) -> None:
        from prefect.client.orchestration import get_client

        safe = "".join(c if c.isalnum() else "-" for c in key.lower()).strip("-")
        self.names: dict[str, str] = {}
        with get_client(sync_client=True) as client:
            for unit, rate in (("requests", quota.requests_per_s), ("units", quota.units_per_s)):
                if not rate:
                    continue
                name = f"visionroute-{safe}-{unit}"
                # Slots are the burst, slot decay the rate: the same half-second burst as the local bucket.
                limit = max(math.ceil(rate * burst_s), max_units if unit == "units" else 1)
                try:
                    client.upsert_global_concurrency_limit_by_name(name, limit, slot_decay_per_second=rate)
                except Exception:  # another process created it between our read and our create
                    client.read_global_concurrency_limit_by_name(name)
                self.names[unit] = name

    def acquire(self, requests: int = 1, units: int = 1) -> None:
        from prefect.concurrency.sync import rate_limit

        for unit, name in self.names.items():
            rate_limit(name, occupy=requests if unit == "requests" else units, strict=True)


def prefect_server_configured() -> bool:
    return bool(os.environ.get("PREFECT_API_URL"))


class Limiter:
    """What the runner calls: this process's bucket, then the cross-process Prefect limit when there is one."""

    def __init__(self, local: RateLimiter | None, shared: PrefectRateLimit | None = None) -> None:
        self.local = local
        self.shared = shared

    def acquire(self, requests: int = 1, units: int = 1) -> None:
        if self.local:
            self.local.acquire(requests, units)
        if self.shared:
            try:
                self.shared.acquire(requests, units)
            except Exception as error:  # the server went away mid-job: this process's bucket still holds
                log.warning(
                    "Prefect global rate limit failed (%r); limiting this process only from now", error
                )
                self.shared = None

    def pause(self, seconds: float) -> None:
        if self.local:
            self.local.pause(seconds)


def limiter_for(key: str, quota: Quota | None, max_units: int, cross_process: bool | None = None) -> Limiter:
    """A limiter for one provider endpoint: unlimited when there is no quota (the on-premises provider)."""
    if quota is None or not (quota.requests_per_s or quota.units_per_s):
        return Limiter(None)
    shared = None
    if cross_process if cross_process is not None else prefect_server_configured():
        try:
            shared = PrefectRateLimit(key, quota, max_units)
        except Exception as error:  # the server is down or too old: the local bucket still holds the quota
            log.warning("Prefect global rate limit unavailable (%r); limiting this process only", error)
    return Limiter(shared_limiter(key, quota, max_units), shared)
