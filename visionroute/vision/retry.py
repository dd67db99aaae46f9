"""When and how long to wait before sending a failed request again: only retryable failures, exponential
backoff with full jitter (AWS Architecture Blog, "Exponential Backoff and Jitter"), the server's Retry-After
honoured, and a deadline after which the image is recorded as failed instead of retried forever."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    base_s: float = 0.5
    """First backoff ceiling; doubles each attempt."""
    cap_s: float = 20.0
    """Largest backoff ceiling."""
    max_attempts: int = 8
    """Attempts per request, the first included."""
    deadline_s: float = 120.0
    """No retry starts later than this after the request was first sent."""

    def delay(self, attempt: int, rng: random.Random, retry_after: float | None = None) -> float:
        """Seconds to wait before attempt `attempt + 1` (attempt counts from 1). Full jitter spreads the
        retries of many workers; a server's Retry-After is a floor, never shortened by the jitter."""
        ceiling = min(self.cap_s, self.base_s * 2 ** (attempt - 1))
        jittered = rng.uniform(0.0, ceiling)
        return max(jittered, retry_after) if retry_after else jittered

    def allows(self, attempt: int, elapsed_s: float, wait_s: float) -> bool:
        """Whether attempt `attempt + 1` may start `wait_s` from now, `elapsed_s` after the first send."""
        return attempt < self.max_attempts and elapsed_s + wait_s <= self.deadline_s
