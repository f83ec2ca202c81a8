"""Job-finished notifications, so waiting clients learn of a result without polling the database.

Workers publish the id of every job they finish on one Redis channel; each gateway process holds a
single subscription and wakes the requests waiting on those ids. On the embedded default (no Redis)
there is nothing to publish to, and waiters fall back to reading the row at a short interval.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from functools import lru_cache

import redis

from shared.settings import get_settings

CHANNEL = "llmq:jobs:finished"
log = logging.getLogger(__name__)


def redis_url() -> str | None:
    """The Redis URL notifications travel on, or None when the broker is not Redis."""
    url = get_settings().resolved_broker_url
    return url if url.startswith(("redis://", "rediss://", "unix://")) else None


@lru_cache
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def publish_finished(job_ids: Iterable[str]) -> None:
    """Tells every gateway that these jobs reached a terminal state (best effort: waiters re-check)."""
    url = redis_url()
    if url is None:
        return
    try:
        client = _client(url)
        for job_id in job_ids:
            client.publish(CHANNEL, job_id)
    except redis.RedisError as exc:
        log.warning("could not publish job-finished notification: %s", exc)
