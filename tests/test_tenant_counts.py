"""The per-tenant active-job counts Postgres keeps (migration 0012: a trigger on jobs appends each +1 / -1, the
gateway's submit folds them in under the tenant's lock) agree with counting the jobs, whatever changes a job:
created by the ORM or by the gateway's grouped insert, claimed, succeeded, failed, cancelled, handed back,
requeued or failed by the reaper, paused and resumed, deleted; batch requests never count. And the gateway's
submit refuses at the quota, and admits again once workers end jobs, from the folded count alone."""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.orm import Session

from shared import job_states
from shared.db import make_engine
from shared.job_data import ErrorCode, GenerationParams, GenerationResult, Usage
from shared.models import Job, TenantActiveChange, TenantActiveJobs, utcnow
from shared.statuses import JobStatus
from shared.tenant_counts import fold_piled_up

BASE = "tenant-counts-base"  # no worker serves it
ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)
DONE = GenerationResult(outputs=[], usage=Usage(prompt_tokens=1, completion_tokens=0, total_tokens=1))


@pytest.fixture
def session(postgres_url: str) -> Iterator[Session]:
    engine = make_engine(postgres_url)
    with Session(engine, expire_on_commit=False) as session:
        yield session
    engine.dispose()


def kept_counts(session: Session, tenants: list[str]) -> dict[str, int]:
    """Each tenant's count as the gateway would fold it: the folded row plus the changes not folded yet."""
    folded = dict(session.execute(select(TenantActiveJobs.tenant, TenantActiveJobs.active)
                                  .where(TenantActiveJobs.tenant.in_(tenants))).tuples().all())  # fmt: skip
    changes = dict(session.execute(select(TenantActiveChange.tenant, func.sum(TenantActiveChange.delta))
                                   .where(TenantActiveChange.tenant.in_(tenants))
                                   .group_by(TenantActiveChange.tenant)).tuples().all())  # fmt: skip
    return {t: int(folded.get(t, 0)) + int(changes.get(t, 0)) for t in tenants}


def counted(session: Session, tenants: list[str]) -> dict[str, int]:
    active = Job.tenant.in_(tenants) & Job.status.in_(ACTIVE) & Job.batch_id.is_(None)
    rows = dict(session.execute(select(Job.tenant, func.count()).where(active).group_by(Job.tenant)).tuples().all())
    return {t: int(rows.get(t, 0)) for t in tenants}


def params() -> GenerationParams:
    return GenerationParams(prompts=["Hello"], max_new_tokens=1)


def claim(session: Session, limit: int, base: str = BASE) -> list[job_states.Claim]:
    return job_states.claim_batch(session, kind="generate", base_model=base, worker="w", lease_seconds=60,
                                  limit=limit)  # fmt: skip


class Walk:
    """Random changes to the jobs of a few tenants, through the functions the gateway, workers and reaper use."""

    def __init__(self, session: Session, tenants: list[str], seed: int) -> None:
        self.session, self.tenants, self.rng = session, tenants, random.Random(seed)
        self.held: list[job_states.Claim] = []

    def create(self) -> None:
        job_states.create_job(self.session, kind="generate", model=BASE, base_model=BASE, params=params(),
                              max_attempts=2, tenant=self.rng.choice(self.tenants))  # fmt: skip
        self.session.commit()

    def create_batch_request(self) -> None:
        job_states.create_batch_request(self.session, batch_id="batch_counts", custom_id=secrets.token_hex(4),
                                        line=1, model=BASE, base_model=BASE, params=params(), max_attempts=3,
                                        tenant=self.rng.choice(self.tenants))  # fmt: skip
        self.session.commit()

    def claim(self) -> None:
        self.held += claim(self.session, self.rng.randint(1, 4))

    def succeed(self) -> None:
        if self.held:
            job_states.succeed(self.session, self._one_held(), DONE)

    def fail(self) -> None:
        if self.held:
            job_states.fail(self.session, self._one_held(), ErrorCode.GENERATION_FAILED, "boom")

    def hand_back(self) -> None:
        if self.held:
            job_states.hand_back(self.session, self._one_held())

    def reap(self) -> None:
        self.session.execute(update(Job).where(Job.tenant.in_(self.tenants), Job.status == JobStatus.RUNNING)
                             .values(lease_expires_at=utcnow() - timedelta(seconds=1)))  # fmt: skip
        self.session.commit()
        job_states.requeue_expired(self.session)
        job_states.fail_exhausted(self.session)
        self.held.clear()

    def cancel(self) -> None:
        job_id = self._queued()
        if job_id is not None:
            job_states.cancel(self.session, job_id)

    def delete(self) -> None:
        job_id = self.session.scalar(select(Job.id).where(Job.tenant.in_(self.tenants)).limit(1))
        if job_id is not None:
            self.session.execute(delete(Job).where(Job.id == job_id))
            self.session.commit()

    def move(self) -> None:  # no route moves a job to another tenant; the trigger counts it all the same
        job_id = self._queued()
        if job_id is not None:
            self.session.execute(update(Job).where(Job.id == job_id).values(tenant=self.rng.choice(self.tenants)))
            self.session.commit()

    def _one_held(self) -> job_states.Claim:
        return self.held.pop(self.rng.randrange(len(self.held)))

    def _queued(self) -> str | None:
        query = select(Job.id).where(Job.tenant.in_(self.tenants), Job.status == JobStatus.QUEUED).limit(1)
        return self.session.scalar(query)


def test_kept_counts_equal_counted_jobs_through_every_change_a_job_goes_through(session: Session) -> None:
    tenants = [f"counts-{secrets.token_hex(3)}" for _ in range(3)]
    walk = Walk(session, tenants, seed=13)
    steps: list[tuple[Callable[[], None], int]] = [
        (walk.create, 6), (walk.create_batch_request, 3), (walk.claim, 3), (walk.succeed, 2), (walk.fail, 1),
        (walk.hand_back, 1), (walk.reap, 1), (walk.cancel, 1), (walk.delete, 1), (walk.move, 1),
    ]  # fmt: skip
    for step in range(150):
        act = walk.rng.choices([a for a, _ in steps], [w for _, w in steps])[0]
        act()
        assert kept_counts(session, tenants) == counted(session, tenants), f"after step {step}: {act.__name__}"
    assert sum(counted(session, tenants).values()) > 0

    folded = fold_piled_up(session, at_least=1)  # what the reaper does for changes that piled up

    assert {t: folded[t] for t in tenants if t in folded} == {t: n for t, n in counted(session, tenants).items()
                                                                if t in folded}  # fmt: skip
    left = select(func.count()).select_from(TenantActiveChange).where(TenantActiveChange.tenant.in_(tenants))
    assert session.scalar(left) == 0 and kept_counts(session, tenants) == counted(session, tenants)


def test_truncating_the_jobs_forgets_every_count() -> None:
    from tests.servers import own_database

    with own_database("llmq_truncate") as url:
        engine = make_engine(url)
        with Session(engine) as session:
            walk = Walk(session, ["t1", "t2"], seed=1)
            for _ in range(6):
                walk.create()
            fold_piled_up(session, at_least=1)
            walk.create()
            session.execute(text("TRUNCATE jobs CASCADE"))
            session.commit()
            assert session.scalar(select(func.count()).select_from(TenantActiveJobs)) == 0
            assert session.scalar(select(func.count()).select_from(TenantActiveChange)) == 0
            walk.create()
            assert kept_counts(session, ["t1", "t2"]) == counted(session, ["t1", "t2"])
        engine.dispose()


def test_the_gateway_s_submit_refuses_at_the_quota_and_admits_again_once_jobs_end(
    postgres_url: str, session: Session
) -> None:
    from gateway import pg

    tenant = f"counts-{secrets.token_hex(3)}"
    base = f"{BASE}-{tenant}"  # its jobs only, for the claim below

    def row() -> pg.JobRow:
        now = utcnow()
        return pg.JobRow(id=f"gen-{secrets.token_hex(12)}", tenant=tenant, kind="generate", status="queued",
                         model=base, base_model=base, params=job_states.stored(params()), result=None, error=None,
                         attempt=0, max_attempts=3, worker=None, lease_expires_at=None, cancel_requested=False,
                         published_at=now, created_at=now, started_at=None, finished_at=None,
                         updated_at=now)  # fmt: skip

    async def submit(count: int, quota: int) -> list[str]:
        """Submits count jobs at once; 'ok' or the refusal of each."""
        pool = await pg.open_pool(postgres_url)
        assert pool is not None
        inserts = pg.GroupedInserts(pool)

        async def one() -> str:
            try:
                await pg.insert_job(pool, inserts, row(), quota)
            except pg.RateLimited as exc:
                return str(exc)
            return "ok"

        try:
            return list(await asyncio.gather(*(one() for _ in range(count))))
        finally:
            await pool.close()

    first = asyncio.run(submit(12, quota=5))
    assert first.count("ok") == 5 and set(first) - {"ok"} == {"5 jobs queued or running; at most 5 at once"}
    claims = claim(session, 3, base)  # a worker takes 3 and ends 2 of them
    job_states.succeed(session, claims[0], DONE)
    job_states.cancel(session, claims[1].job_id)  # running: cancelled at its next step
    job_states.finish_cancelled(session, claims[1])

    again = asyncio.run(submit(4, quota=5))

    assert again.count("ok") == 2
    assert counted(session, [tenant]) == kept_counts(session, [tenant]) == {tenant: 5}
    assert session.scalar(select(TenantActiveJobs.active).where(TenantActiveJobs.tenant == tenant)) == 5
