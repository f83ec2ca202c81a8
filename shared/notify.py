"""Job-finished notifications, so waiting clients learn of a result without polling the database.

Workers publish the id of every job they finish on one Redis channel; each gateway process holds a
single subscription and wakes the requests waiting on those ids. On the embedded default (no Redis)
there is nothing to publish to, and waiters fall back to reading the row at a short interval.
"""

from __future__ import annotations

import json
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


def stream_channel(job_id: str) -> str:
    """The channel a streaming job's text deltas travel on."""
    return f"llmq:stream:{job_id}"


def publish_deltas(job_id: str, attempt: int, deltas: dict[int, str]) -> None:
    """Sends new text of a streaming job's outputs (output index -> text to append), best effort."""
    url = redis_url()
    if url is None or not deltas:
        return
    try:
        _client(url).publish(stream_channel(job_id), json.dumps({"attempt": attempt, "deltas": deltas}))
    except redis.RedisError as exc:
        log.warning("could not publish stream delta: %s", exc)


def publish_stream_end(job_id: str) -> None:
    """Tells a streaming job's listener that the job's row is final."""
    url = redis_url()
    if url is None:
        return
    try:
        _client(url).publish(stream_channel(job_id), json.dumps({"done": True}))
    except redis.RedisError as exc:
        log.warning("could not publish stream end: %s", exc)


def publish_finished(job_ids: Iterable[str]) -> None:
    """Tells every gateway that these jobs reached a terminal state (best effort: waiters re-check)."""
    url = redis_url()
    if url is None:
        return
    try:
        pipe = _client(url).pipeline(transaction=False)  # one round trip for a batch's jobs
        for job_id in job_ids:
            pipe.publish(CHANNEL, job_id)
        pipe.execute()
    except redis.RedisError as exc:
        log.warning("could not publish job-finished notification: %s", exc)
