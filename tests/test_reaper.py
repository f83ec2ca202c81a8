"""The reaper and leases on real Postgres and Redis: expired leases, exhausted attempts, lost messages."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import delete, update
from sqlalchemy.orm import Session

from shared import job_states
from shared.job_data import FineTuneParams, FineTuneResult, GenerationParams, JobKind
from shared.models import Job, utcnow
from shared.statuses import JobStatus
from tests.process_settings import configure, reset_caches


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


def new_job(session: Session, kind: JobKind = "generate", max_attempts: int = 3) -> str:
    params = GenerationParams(prompts=["x"], max_tokens=1) if kind == "generate" else FineTuneParams(hyperparameters={})
    job = job_states.create_job(session, kind=kind, model="m", base_model="m", params=params, max_attempts=max_attempts)
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
    assert not job_states.succeed(session, claim, FineTuneResult(fine_tuned_model="from the dead worker"))


def test_an_export_whose_worker_died_goes_back_to_the_train_queue_as_an_export(
    session: Session, quiet_redis_url: str
) -> None:
    from shared.job_data import ExportParams

    job = job_states.create_job(
        session, kind="export", model="ft:m:x:ftjob-1", base_model="m",
        params=ExportParams(fine_tuning_job_id="ftjob-1"), max_attempts=3,
    )  # fmt: skip
    session.commit()
    assert job_states.claim(session, job.id, worker="dead", lease_seconds=60) is not None
    expire(session, job.id)
    assert reap(session).requeued == [job.id]  # type: ignore[attr-defined]
    (message,) = redis.Redis.from_url(quiet_redis_url).lrange("train", 0, -1)
    assert json.loads(message)["headers"]["task"] == "llmq.export"  # a train worker runs it again, from the start
    assert queued_ids(quiet_redis_url, "train") == [job.id]


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
    # A renewal already in flight when the block ended may still land (late on a loaded machine): the lease
    # must run out within a few leases after that, and the keeper must never renew it again.
    deadline = time.monotonic() + 6
    requeued: list[str] = []
    while not requeued and time.monotonic() < deadline:
        time.sleep(0.3)
        requeued = reap(session).requeued  # type: ignore[attr-defined]
    assert requeued == [job_id]


def make_old(session: Session, *job_ids: str) -> None:
    """As if each job's last message went out five minutes ago (longer than republish_after_seconds)."""
    session.execute(update(Job).where(Job.id.in_(job_ids)).values(published_at=utcnow() - timedelta(minutes=5)))
    session.commit()


def test_a_long_backlog_whose_messages_are_all_waiting_gets_no_duplicates(
    session: Session, quiet_redis_url: str
) -> None:
    from shared.celery_app import enqueue

    backlog = [new_job(session) for _ in range(5)]
    for job_id in backlog:
        enqueue("generate", job_id)
    make_old(session, *backlog)  # queued long, but only because no worker has come yet
    assert reap(session).republished == []  # type: ignore[attr-defined]
    assert sorted(queued_ids(quiet_redis_url, "generate")) == sorted(backlog)


def test_only_as_many_messages_as_are_missing_are_resent_for_the_oldest_jobs(
    session: Session, quiet_redis_url: str
) -> None:
    from shared.celery_app import enqueue

    backlog = [new_job(session) for _ in range(5)]
    enqueue("generate", backlog[3])
    enqueue("generate", backlog[4])  # three of the five messages were lost
    make_old(session, *backlog)
    assert reap(session).republished == backlog[:3]  # type: ignore[attr-defined]
    assert len(queued_ids(quiet_redis_url, "generate")) == 5
    make_old(session, *backlog)
    assert reap(session).republished == []  # type: ignore[attr-defined]


def test_messages_on_a_priority_sub_queue_count_too(session: Session, quiet_redis_url: str) -> None:
    from shared.celery_app import get_celery

    job_id = new_job(session)
    get_celery().send_task("llmq.generate", args=[job_id], queue="generate", priority=5)
    make_old(session, job_id)
    assert redis.Redis.from_url(quiet_redis_url).llen("generate") == 0  # it sits in generate\x06\x163
    assert reap(session).republished == []  # type: ignore[attr-defined]


def test_a_train_job_queued_long_gets_another_message_even_when_others_wait(session: Session) -> None:
    from shared.celery_app import enqueue

    waiting, lost = new_job(session, kind="train"), new_job(session, kind="train")
    enqueue("train", waiting)
    enqueue("train", waiting)  # as many train messages as train jobs, but none names `lost`
    make_old(session, waiting, lost)
    assert reap(session).republished == [waiting, lost]  # type: ignore[attr-defined]


def test_the_file_broker_counts_its_message_files(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    configure(monkeypatch, database_url=postgres_url, data_dir=str(tmp_path), republish_after_seconds="30")
    monkeypatch.delenv("LLMQ_BROKER_URL", raising=False)
    reset_caches()
    from shared.celery_app import enqueue
    from shared.db import get_sessionmaker

    with get_sessionmaker()() as s:
        s.execute(delete(Job))
        s.commit()
        waiting, lost = new_job(s), new_job(s)
        enqueue("generate", waiting)
        make_old(s, waiting, lost)
        assert reap(s).republished == [waiting]  # type: ignore[attr-defined]  # the oldest, for the one lost
        assert len(list((tmp_path / "broker" / "queue").glob("*.generate.msg"))) == 2
        make_old(s, waiting, lost)
        assert reap(s).republished == []  # type: ignore[attr-defined]
