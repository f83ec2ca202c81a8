"""The gateway's Redis subscriptions close within a deadline, even when redis-py's close stalls
(redis/redis-py#3941: a close waiting forever for its socket hung the gateway's shutdown)."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio.client import PubSub

from gateway.closing import close_within
from gateway.waiting import FinishedJobs


async def never_finishes(*_args: object, **_kwargs: object) -> None:
    await asyncio.Event().wait()


def test_a_close_that_stalls_is_given_up_after_its_deadline() -> None:
    async def run() -> tuple[bool, float]:
        started = time.monotonic()
        completed = await close_within(never_finishes(), "a stalled connection", timeout=0.2)
        return completed, time.monotonic() - started

    completed, took = asyncio.run(run())
    assert not completed and took < 1.0


def test_a_close_that_completes_reports_so() -> None:
    assert asyncio.run(close_within(asyncio.sleep(0), "a healthy connection", timeout=1.0))


def test_stopping_the_job_finished_listener_returns_when_the_redis_close_stalls(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(PubSub, "aclose", never_finishes)

    async def run() -> float:
        finished = FinishedJobs(redis_url)
        await finished.start()
        for _ in range(100):  # subscribed, so the listener sits in the pub/sub read
            if finished._subscribed.is_set():
                break
            await asyncio.sleep(0.05)
        assert finished._subscribed.is_set()
        started = time.monotonic()
        await finished.stop()
        return time.monotonic() - started

    assert asyncio.run(run()) < 6.0
