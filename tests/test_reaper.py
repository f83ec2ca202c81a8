"""The reaper and leases on real Postgres and Redis: expired leases, exhausted attempts, lost messages."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta

import pytest
import redis
from sqlalchemy import delete, update
from sqlalchemy.orm import Session

from shared import job_states
from shared.models import Job, utcnow
from shared.statuses import JobStatus
from tests.conftest import configure


@pytest.fixture
def session(postgres_url: str, quiet_redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Session]:
    configure(monkeypatch, database_url=postgres_url, broker_url=quiet_redis_url, republish_after_seconds="30")
    from shared.db import get_sessionmaker

    redis.Redis.from_url(quiet_redis_url).flushdb()
    with get_sessionmaker()() as s:
        s.execute(delete(Job))
        s.commit()
        yield s


def queued_ids(url: str, queue: str) -> list[str]:
    import base64

    messages = redis.Redis.from_url(url).lrange(queue, 0, -1)
    return [json.loads(base64.b64decode(json.loads(m)["body"]))[0][0] for m in messages]


def new_job(session: Session, kind: str = "generate", max_attempts: int = 3) -> str:
    job = job_states.create_job(
        session, kind=kind, model="m", base_model="m", params={"prompts": ["x"], "max_tokens": 1},
        max_attempts=max_attempts,
    )  # fmt: skip
    session.commit()
    return job.id


def expire(session: Session, job_id: str) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    session.commit()


def reap(session: Session) -> object:
    from shared.reaper import reap_once
    from shared.settings import get_settings

    return reap_once(session, get_settings())


def test_expired_lease_returns_the_job_to_the_queue_and_resends_its_message(
    session: Session, quiet_redis_url: str
) -> None:
    job_id = new_job(session, kind="train")
    claim = job_states.claim(session, job_id, worker="dead", lease_seconds=60)
    assert claim is not None
    expire(session, job_id)
    reaped = reap(session)
    assert reaped.requeued == [job_id]  # type: ignore[attr-defined]
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None and job.status == JobStatus.QUEUED and job.attempt == 1
    assert queued_ids(quiet_redis_url, "train") == [job_id]
    again = job_states.claim(session, job_id, worker="alive", lease_seconds=60)
    assert again is not None and again.attempt == 2
    assert not job_states.succeed(session, claim, {"from": "the dead worker"})


def test_live_lease_is_left_alone(session: Session) -> None:
    job_id = new_job(session)
    claim = job_states.claim(session, job_id, worker="w", lease_seconds=60)
    assert claim is not None
    assert reap(session).requeued == []  # type: ignore[attr-defined]
    assert job_states.renew_lease(session, claim, 60)


def test_job_whose_worker_dies_on_every_attempt_ends_failed(session: Session) -> None:
    job_id = new_job(session, max_attempts=2)
    for _ in range(2):
        assert job_states.claim(session, job_id, worker="w", lease_seconds=60) is not None
        expire(session, job_id)
        reap(session)
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None and job.status == JobStatus.FAILED and job.attempt == 2
    assert job.error is not None and job.error["code"] == "max_attempts_exceeded"


def test_job_whose_message_was_lost_gets_another(session: Session, quiet_redis_url: str) -> None:
    fresh, old = new_job(session), new_job(session)
    session.execute(update(Job).where(Job.id == old).values(published_at=utcnow() - timedelta(minutes=5)))
    session.commit()
    assert reap(session).republished == [old]  # type: ignore[attr-defined]
    assert queued_ids(quiet_redis_url, "generate") == [old]
    assert reap(session).republished == []  # type: ignore[attr-defined]  # not again until it is old again
    assert fresh


def test_job_that_crashed_a_worker_is_claimed_alone(session: Session) -> None:
    suspect = new_job(session)
    others = [new_job(session) for _ in range(3)]
    assert job_states.claim(session, suspect, worker="w", lease_seconds=60) is not None
    expire(session, suspect)
    reap(session)
    first = job_states.claim_batch(session, kind="generate", base_model="m", worker="w", lease_seconds=60, limit=8)
    assert [c.job_id for c in first] == [suspect]
    second = job_states.claim_batch(session, kind="generate", base_model="m", worker="w", lease_seconds=60, limit=8)
    assert sorted(c.job_id for c in second) == sorted(others)


def test_lease_keeper_renews_while_a_job_runs(session: Session) -> None:
    import time

    from worker.leases import LeaseKeeper

    job_id = new_job(session)
    claim = job_states.claim(session, job_id, worker="w", lease_seconds=0.6)
    assert claim is not None
    keeper = LeaseKeeper(lease_seconds=0.6)
    with keeper.holding([claim]):
        time.sleep(1.5)  # more than two leases
        assert reap(session).requeued == []  # type: ignore[attr-defined]
    time.sleep(0.8)
    assert reap(session).requeued == [job_id]  # type: ignore[attr-defined]
