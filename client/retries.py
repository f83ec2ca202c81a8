"""When the client tries a request again, and how long it waits first.

Retried: 429 and 503 answers (the server did not do the work) and failures to connect (the request never
left). Other transport failures (a read timeout, a dropped connection) are retried only for methods that
are safe to repeat, since a POST that timed out may already have created its job.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import httpx

RETRY_STATUSES = frozenset({429, 503})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "PUT"})


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter; a server's Retry-After wins over the computed delay."""

    retries: int = 3  # further attempts after the first one; 0 = never retry
    backoff: float = 0.5  # seconds before the first retry (before jitter); doubles each time
    max_backoff: float = 30.0  # cap on a computed delay, seconds
    max_retry_after: float = 120.0  # a Retry-After longer than this is not waited for: the error is raised
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def delay(self, attempt: int, retry_after: float | None = None) -> float | None:
        """Seconds to wait before retry number attempt + 1 (attempt counts from 0); None means give up."""
        if attempt >= self.retries:
            return None
        if retry_after is not None:
            return retry_after if retry_after <= self.max_retry_after else None
        ceiling = min(self.max_backoff, self.backoff * 2**attempt)
        # "Equal jitter": at least half the exponential delay, so waits still grow, and spread over the
        # other half, so clients that failed together do not come back together.
        return ceiling / 2 + self.rng.uniform(0, ceiling / 2)

    @staticmethod
    def retryable_status(status_code: int) -> bool:
        """True for answers that mean "not done, try later"."""
        return status_code in RETRY_STATUSES

    @staticmethod
    def retryable_error(method: str, error: httpx.TransportError) -> bool:
        """True when a transport failure may be retried for this method without doing the work twice."""
        if isinstance(error, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
            return True  # the request was never sent
        return method.upper() in IDEMPOTENT_METHODS
