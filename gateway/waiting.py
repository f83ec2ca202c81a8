"""Waiting for jobs to finish without polling the database in a loop.

One Redis subscription per gateway process receives the id of every job a worker finishes and wakes
the requests waiting on it. Without Redis (the embedded default) waiters re-read the row at a short
interval instead. Routes wait through until_terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from gateway.closing import CLOSE_TIMEOUT_SECONDS, close_within
from shared.db import get_sessionmaker
from shared.models import Job
from shared.notify import CHANNEL
from shared.statuses import is_terminal

log = logging.getLogger(__name__)

EMBEDDED_POLL_SECONDS = 0.02
# A safety net: a notification lost while Redis reconnects delays a waiter by at most this.
SUBSCRIBED_RECHECK_SECONDS = 2.0


class FinishedJobs:
    """Wakes requests waiting on job ids when a worker announces that those jobs finished."""

    def __init__(self, redis_url: str | None) -> None:
        self._redis_url = redis_url
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    async def start(self) -> None:
        """Starts listening (no-op without Redis)."""
        if self._redis_url is not None:
            self._task = asyncio.create_task(self._listen(self._redis_url), name="finished-jobs")

    async def stop(self) -> None:
        """Stops listening (within a few seconds, even if Redis's close stalls)."""
        if self._task is not None:
            self._task.cancel()
            await close_within(self._task, "the job-finished subscription", timeout=2 * CLOSE_TIMEOUT_SECONDS)

    async def _listen(self, url: str) -> None:
        while True:
            client = aioredis.Redis.from_url(url)
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(CHANNEL)
                self._subscribed.set()
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._wake(message["data"].decode())
            except (RedisError, OSError) as exc:
                log.warning("job-finished subscription lost (%s); reconnecting", exc)
            finally:
                self._subscribed.clear()
                # Whoever waits may have missed a message: let them re-read their row.
                for job_id in list(self._waiters):
                    self._wake(job_id)
                await close_within(pubsub.aclose(), "the job-finished subscription")  # type: ignore[no-untyped-call]
                await close_within(client.aclose(), "the job-finished Redis client")
            await asyncio.sleep(1.0)

    def _wake(self, job_id: str) -> None:
        for event in self._waiters.get(job_id, ()):
            event.set()

    async def wait(self, job_id: str, timeout: float, is_finished: Callable[[], Awaitable[bool]]) -> None:
        """Returns once is_finished() is true or timeout seconds have passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        event = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(event)
        try:
            # Registered before the first check, so a finish between the two is never missed.
            while not await is_finished():
                left = deadline - loop.time()
                if left <= 0:
                    return
                step = SUBSCRIBED_RECHECK_SECONDS if self._subscribed.is_set() else EMBEDDED_POLL_SECONDS
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(left, step))
                event.clear()
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[job_id]


def read_job(job_id: str) -> Job | None:
    """The job row as it stands now (any tenant's: for a job the caller itself just submitted)."""
    with get_sessionmaker()() as session:
        return session.get(Job, job_id)


async def until_terminal(
    request: Request,
    job_id: str,
    timeout: float,
    *,
    read: Callable[[], Job | None] | None = None,
    until_disconnected: bool = False,
) -> Job | None:
    """The job as last read once it is terminal, or as it stood when timeout seconds passed (or, with
    until_disconnected, when the client went away); None when there is no such job.

    read reads the row (in a worker thread): by default read_job; a route that answers for a tenant passes
    its own (gateway.owned), so another tenant's job reads as None.
    """
    latest: Job | None = None

    async def finished() -> bool:
        nonlocal latest
        latest = await run_in_threadpool(read or (lambda: read_job(job_id)))
        if latest is None or is_terminal(latest.status):
            return True
        return until_disconnected and await request.is_disconnected()

    finished_jobs: FinishedJobs = request.app.state.finished_jobs
    await finished_jobs.wait(job_id, timeout, finished)
    return latest
