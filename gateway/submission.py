"""Turning a validated request into a job: caps, the tenant's quota, the row, the commit, the message."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from fastapi.exceptions import RequestValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from gateway import pg
from gateway.errors import RateLimited
from gateway.front_door import FrontDoor
from gateway.publish import publish
from shared import job_states
from shared.celery_app import enqueue_after_commit
from shared.counters import JOBS_SUBMITTED
from shared.db import get_sessionmaker
from shared.job_data import JobKind, JobParams
from shared.models import Job, new_id, utcnow
from shared.settings import Settings
from shared.statuses import JobStatus
from shared.tenant_counts import lock_tenant

Loc = tuple[str | int, ...]


def check_caps(
    prompts: list[str],
    field: str,
    single: bool,
    max_tokens: int,
    n: int,
    stop: list[str] | None,
    settings: Settings,
) -> None:
    """422 naming the field when a request exceeds a configured cap or holds no prompt or an empty one."""
    errors: list[tuple[Loc, str]] = []
    if not prompts:
        errors.append((("body", field), "must hold at least one prompt"))
    if stop is not None and sum(len(s) for s in stop) > settings.max_stop_chars:
        errors.append((("body", "stop"), f"stop strings longer than {settings.max_stop_chars} characters together"))
    if max_tokens > settings.max_new_tokens:
        errors.append((("body", "max_tokens"), f"must be at most {settings.max_new_tokens}"))
    if n > settings.max_n:
        errors.append((("body", "n"), f"must be at most {settings.max_n}"))
    if len(prompts) * n > settings.max_prompts_per_job:
        errors.append((("body", field), f"at most {settings.max_prompts_per_job} outputs (prompts x n) per job"))
    for i, prompt in enumerate(prompts):
        loc: Loc = ("body", field) if single else ("body", field, i)
        if not prompt:
            errors.append((loc, "prompt must not be empty"))
        elif len(prompt) > settings.max_prompt_chars:
            errors.append((loc, f"prompt longer than {settings.max_prompt_chars} characters"))
    if errors:
        raise RequestValidationError(
            [{"type": "value_error", "loc": loc, "msg": msg, "input": None} for loc, msg in errors]
        )


@contextmanager
def quota_reserved(session: Session, settings: Settings, tenant: str) -> Iterator[None]:
    """check_quota under the tenant's lock; the block inserts the job and commits, which releases the lock.

    A count followed by an insert lets simultaneous submits all count the same jobs and all get in; under the
    lock the submits of one tenant count one after another, each seeing the jobs committed before it. Other
    tenants never wait: Postgres takes a transaction-scoped advisory lock on a hash of the tenant; SQLite,
    which has one writer at a time anyway, begins the transaction as a write (BEGIN IMMEDIATE).

    A refusal or an error rolls back at once, in this thread: left to the request's session cleanup, the
    release would wait for a free worker thread while every worker thread waits for the lock.
    """
    try:
        if settings.max_active_jobs_per_tenant:
            _lock_tenant(session, tenant)
            check_quota(session, settings, tenant)
        yield
    except BaseException:
        session.rollback()
        raise


def _lock_tenant(session: Session, tenant: str) -> None:
    connection = session.connection()
    dialect = connection.dialect.name
    if dialect == "postgresql":
        lock_tenant(session, tenant)
    # pysqlite begins a transaction only before its first write: begin it now, as a write, so the count
    # below already holds SQLite's one write lock (it waits for it up to the busy timeout).
    elif dialect == "sqlite" and not connection.connection.driver_connection.in_transaction:  # type: ignore[union-attr]
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def check_quota(session: Session, settings: Settings, tenant: str) -> None:
    """429 when the tenant already has max_active_jobs_per_tenant jobs queued or running (no lock: a
    read-only early answer; quota_reserved is what holds under concurrency)."""
    if settings.max_active_jobs_per_tenant == 0:
        return
    # Counts at most up to the quota: a tenant far over it costs no more than one at it.
    active_jobs = (
        select(Job.id)
        # A batch's requests are bounded by LLMQ_MAX_BATCH_REQUESTS instead: they wait behind interactive jobs and
        # must not fill the quota that interactive requests need.
        .where(Job.tenant == tenant, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]), Job.batch_id.is_(None))
        .limit(settings.max_active_jobs_per_tenant)
        .subquery()
    )
    active = session.scalar(select(func.count()).select_from(active_jobs))
    if (active or 0) >= settings.max_active_jobs_per_tenant:
        raise RateLimited(
            f"{active} jobs queued or running; at most {settings.max_active_jobs_per_tenant} at once", retry_after=5
        )


def submit(
    session: Session,
    settings: Settings,
    *,
    kind: JobKind,
    model: str,
    base_model: str,
    params: JobParams,
    tenant: str,
    job_id: str | None = None,
    event: str | None = None,
) -> Job:
    """Writes the queued job (and its first event, if given), commits, then publishes its id (429 over the
    tenant's quota)."""
    with quota_reserved(session, settings, tenant):
        job = job_states.create_job(
            session,
            tenant=tenant,
            kind=kind,
            model=model,
            base_model=base_model,
            params=params,
            max_attempts=settings.max_attempts,
            job_id=job_id,
        )
        if event is not None:
            job_states.note(session, job, event)
        session.commit()
    enqueue_after_commit(kind, job.id)
    JOBS_SUBMITTED.labels(kind).inc()
    return job


async def submit_async(
    door: FrontDoor,
    settings: Settings,
    *,
    kind: JobKind,
    model: str,
    base_model: str,
    params: JobParams,
    tenant: str,
    job_id: str | None = None,
    event: str | None = None,
) -> Job | pg.JobRow:
    """submit from the event loop, with the same guarantees: the row (under the tenant's quota) is committed
    before its message is published. On Postgres one asyncpg transaction and one LPUSH, no thread hop; on
    SQLite, or with a first event to write, submit in a worker thread."""
    if door.pg is None or event is not None:
        return await run_in_threadpool(
            _submit_in_session, settings, kind, model, base_model, params, tenant, job_id, event
        )
    now = utcnow()
    job = pg.JobRow(
        id=job_id or new_id(job_states.ID_PREFIX[kind]),
        tenant=tenant,
        kind=kind,
        status=JobStatus.QUEUED,
        model=model,
        base_model=base_model,
        params=job_states.stored(params),
        result=None,
        error=None,
        attempt=0,
        max_attempts=settings.max_attempts,
        worker=None,
        lease_expires_at=None,
        cancel_requested=False,
        published_at=now,
        created_at=now,
        started_at=None,
        finished_at=None,
        updated_at=now,
    )  # the row as inserted (gateway.pg.JobRow: building an ORM Job cost about 50 us)
    assert door.inserts is not None  # opened with the pool
    await pg.insert_job(door.pg, door.inserts, job, settings.max_active_jobs_per_tenant)
    await publish(door.broker, kind, job.id)
    JOBS_SUBMITTED.labels(kind).inc()
    return job


def _submit_in_session(
    settings: Settings,
    kind: JobKind,
    model: str,
    base_model: str,
    params: JobParams,
    tenant: str,
    job_id: str | None,
    event: str | None,
) -> Job:
    with get_sessionmaker()() as session:
        return submit(
            session,
            settings,
            kind=kind,
            model=model,
            base_model=base_model,
            params=params,
            tenant=tenant,
            job_id=job_id,
            event=event,
        )
