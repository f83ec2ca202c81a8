"""The job state machine: the only code that changes a job's status.

    queued -> running -> succeeded | failed | cancelled
    queued -> cancelled                      (a client cancels before any worker claimed it)
    running -> queued                        (a lease expired: the reaper hands it to the next worker;
                                              or its worker drains on SIGTERM and hands it back, hand_back)
    running -> paused                        (a client asked to pause: the worker checkpoints and lets go)
    queued -> paused                         (a client pauses a fine-tune no worker claimed yet)
    paused -> queued                         (a client resumes it: any train worker continues from the checkpoint)
    paused -> cancelled                      (a client cancels a paused fine-tune)

A claim reads the first queued rows (SELECT ... FOR UPDATE SKIP LOCKED on Postgres, which locks them until it
commits) and takes those it picks in one UPDATE ... RETURNING (on SQLite guarded by status = 'queued'), so two
workers never get the same job. Every later write of a worker names the attempt it claimed, so a worker whose lease
expired and whose job was claimed again can no longer change it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from sqlalchemy import (
    ColumnElement,
    Select,
    Table,
    bindparam,
    case,
    delete,
    exists,
    func,
    insert,
    literal,
    select,
    tuple_,
    update,
)
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from shared.counters import JOBS_FINISHED, QUEUE_WAIT
from shared.job_data import ErrorCode, Figures, GenerationResult, JobError, JobParams, JobResult
from shared.models import DEFAULT_TENANT, Checkpoint, Job, JobEvent, new_id, utcnow
from shared.statuses import JobStatus
from shared.storable import scrub

ID_PREFIX = {"generate": "gen", "train": "ftjob", "export": "ftexport"}


@dataclass(frozen=True)
class Claim:
    """What a worker holds after claiming a job: the attempt it may write as, and the row it read (a detached
    snapshot of the row at claim time: it never reloads)."""

    job_id: str
    attempt: int
    job: Job


def create_job(
    session: Session,
    *,
    kind: str,
    model: str,
    base_model: str,
    params: JobParams,
    max_attempts: int,
    tenant: str = DEFAULT_TENANT,
    job_id: str | None = None,
) -> Job:
    """A new queued job, added to the session (the caller commits, then enqueues its id)."""
    now = utcnow()
    job = Job(
        id=job_id or new_id(ID_PREFIX[kind]),
        tenant=tenant,
        kind=kind,
        status=JobStatus.QUEUED,
        model=model,
        base_model=base_model,
        params=stored(params),
        attempt=0,
        max_attempts=max_attempts,
        created_at=now,
        published_at=now,  # the caller publishes right after its commit; the reaper repairs a lost one
    )
    session.add(job)
    return job


def claim_batch(
    session: Session,
    *,
    kind: str,
    base_model: str,
    worker: str,
    lease_seconds: float,
    limit: int,
    pick: Callable[[Sequence[Job]], Sequence[str]] | None = None,
    fresh_only: bool = False,
    min_priority: int | None = None,
) -> list[Claim]:
    """Claims the queued jobs of a kind on a base model, higher priority first (interactive before batch
    requests) then oldest first (at most limit, narrowed by pick); commits.

    The session must be a transactional one (not get_read_sessionmaker's autocommit): on Postgres the candidates'
    row locks, held until the claim commits, are what keep another worker from taking them in between. Every
    candidate read is detached from the session, the claimed ones as their claims' snapshots.

    pick chooses which of the candidates (oldest first) to take, e.g. to respect a token budget;
    it may return none when it is given only jobs it does not want now (fresh_only or min_priority set);
    otherwise it must return at least one id. fresh_only leaves jobs that ran before (they run alone, see
    below) for a claim without neighbours. min_priority leaves jobs below it (e.g. batch requests, when a
    running batch has no room for them) unread: the claim index stops at them.
    """
    query = queued_in_claim_order(kind, base_model)
    if fresh_only:
        query = query.where(Job.attempt == 0)
    if min_priority is not None:
        query = query.where(Job.priority >= min_priority)
    candidates, locked = _read_to_claim(session, query.limit(limit).with_for_update(skip_locked=True))
    if not candidates:
        return []
    # A job that was running when its worker died may be what killed it: it runs alone, so a poison
    # job cannot take its batch neighbours down with it again.
    if candidates[0].attempt > 0:
        ids = [candidates[0].id]
    else:
        fresh = [job for job in candidates if job.attempt == 0]
        ids = list(pick(fresh)) if pick else [job.id for job in fresh]
    if not ids:
        session.rollback()
        return []
    chosen = {job.id: job for job in candidates}
    claims = _take(session, worker, lease_seconds, [chosen[i] for i in ids], locked=locked)
    claims.sort(key=lambda c: (-c.job.priority, c.job.created_at, c.job.id))
    return claims


def queued_in_claim_order(kind: str, base_model: str) -> Select[Job]:
    """The queued jobs a claim takes from: higher priority first (interactive jobs before batch requests), then
    the oldest. The index ix_jobs_claim holds them in this order (shared/models.py), so no sort is needed."""
    return (
        select(Job)
        .where(Job.kind == kind, Job.status == JobStatus.QUEUED, Job.base_model == base_model)
        .order_by(Job.priority.desc(), Job.created_at, Job.id)
    )


def claim(session: Session, job_id: str, *, worker: str, lease_seconds: float) -> Claim | None:
    """Claims one job by id if it is still queued, and commits; None when it is not."""
    query = select(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED).with_for_update()
    candidates, locked = _read_to_claim(session, query)
    claims = _take(session, worker, lease_seconds, candidates, locked=locked) if candidates else []
    return claims[0] if claims else None


def _read_to_claim(session: Session, query: Select[Job]) -> tuple[list[Job], bool]:
    """The queued rows a claim may take (query: FOR UPDATE), each detached as read, a claim's snapshot (see Claim:
    no later rollback can expire it); and whether they are locked. SQLite cannot upgrade a read transaction to a
    write one under contention: it claims in a transaction of its own, guarded by the rows' status. On Postgres
    the rows stay locked until the claim commits."""
    candidates = list(session.scalars(query.execution_options(populate_existing=True)))
    for job in candidates:
        session.expunge(job)
    locked = session.get_bind().dialect.name != "sqlite"
    if not candidates or not locked:
        session.rollback()
    return candidates, locked


def stored(data: JobParams | JobResult | JobError) -> dict[str, object]:
    """The JSON a row stores for one of shared.job_data's models: the fields its writer set, nothing more."""
    return data.model_dump(mode="json", exclude_unset=True)


_JOBS: Table = Job.__table__  # type: ignore[assignment]

# The claim of rows already read, by id (Core, built once: a claim runs for every wave of rows a continuous batch
# takes in). No status guard where the rows are locked: Postgres would AND the status index's whole queued range
# into the plan whenever its statistics lag a burst of submits (they counted few queued jobs at the last ANALYZE),
# a scan that grows with the backlog; the ids alone are an index lookup each.
_CLAIM_IDS = _JOBS.c.id.in_(bindparam("ids", expanding=True))
_CLAIM_VALUES = {
    "status": JobStatus.RUNNING,
    "attempt": _JOBS.c.attempt + 1,
    "worker": bindparam("worker"),
    "lease_expires_at": bindparam("lease"),
    "started_at": bindparam("now"),
    "updated_at": bindparam("now"),
}
_CLAIM_LOCKED = update(_JOBS).where(_CLAIM_IDS).values(_CLAIM_VALUES).returning(_JOBS.c.id, _JOBS.c.attempt)
_CLAIM_GUARDED = (
    update(_JOBS)
    .where(_CLAIM_IDS, _JOBS.c.status == JobStatus.QUEUED)
    .values(_CLAIM_VALUES)
    .returning(_JOBS.c.id, _JOBS.c.attempt)
)


def _take(session: Session, worker: str, lease_seconds: float, jobs: Sequence[Job], *, locked: bool) -> list[Claim]:
    """Claims these queued rows, read and detached by the caller (locked: FOR UPDATE in the session's
    transaction; else the UPDATE takes only those still queued), and commits; each claim's job is its row as read,
    with the claim's own columns set as written."""
    now = utcnow()
    lease = now + timedelta(seconds=lease_seconds)
    statement = _CLAIM_LOCKED if locked else _CLAIM_GUARDED
    claimed: dict[str, int] = dict(
        session.execute(statement, {"ids": [job.id for job in jobs], "worker": worker, "lease": lease, "now": now})
        .tuples()
        .all()
    )
    session.commit()
    claims = []
    for job in jobs:
        if job.id not in claimed:
            continue
        for name, value in (("status", JobStatus.RUNNING), ("attempt", claimed[job.id]), ("worker", worker),
                            ("lease_expires_at", lease), ("started_at", now), ("updated_at", now)):  # fmt: skip
            set_committed_value(job, name, value)
        QUEUE_WAIT.labels(job.kind).observe(max((now - job.created_at).total_seconds(), 0.0))
        claims.append(Claim(job.id, claimed[job.id], job))
    return claims


def _guarded_finish(session: Session, claim: Claim, status: JobStatus, **values: object) -> bool:
    """The terminal UPDATE, only while the claim is current (no commit); whether it changed the row."""
    now = utcnow()
    done = session.execute(
        update(Job)
        .where(Job.id == claim.job_id, Job.attempt == claim.attempt, Job.status == JobStatus.RUNNING)
        .values(status=status, finished_at=now, updated_at=now, lease_expires_at=None, **values)
    )
    changed = bool(done.rowcount == 1)  # type: ignore[attr-defined]
    if changed:
        JOBS_FINISHED.labels(claim.job.kind, status.value).inc()
    return changed


def _finish(session: Session, claim: Claim, status: JobStatus, *, add: Sequence[object] = (), **values: object) -> bool:
    if not _guarded_finish(session, claim, status, **values):
        session.rollback()
        return False
    session.add_all(add)
    session.commit()
    return True


# What a worker ends a claimed job with: (result, None) to succeed it, (None, (code, message)) to fail it.
Outcome = tuple[GenerationResult | None, tuple[ErrorCode, str] | None]


def finish_batch(session: Session, outcomes: Sequence[tuple[Claim, Outcome]]) -> list[bool]:
    """Writes the outcome of every claim of a batch in one transaction and commits once; for each claim,
    whether it was written (False where the claim is no longer current: that outcome is dropped).

    Two round trips whatever the batch's size: one SELECT ... FOR UPDATE finds (and locks) the claims still
    current, one executemany UPDATE (pipelined by the driver) writes their outcomes, each still guarded by its
    attempt, so nothing can take a row over in between.
    """
    if not outcomes:
        return []
    attempts = {claim.job_id: claim.attempt for claim, _ in outcomes}
    rows = session.execute(
        select(Job.id, Job.attempt)
        .where(Job.id.in_(attempts), Job.status == JobStatus.RUNNING)
        .order_by(Job.id)  # see _update_in_id_order
        .with_for_update()
    ).all()
    current = {r.id for r in rows if r.attempt == attempts[r.id]}
    table: Table = Job.__table__  # type: ignore[assignment]  # Core: an executemany of plain parameters
    params = []
    for claim, (result, error) in outcomes:
        if claim.job_id not in current:
            continue
        if error is None:
            assert result is not None
            status, stored_result, stored_error = JobStatus.SUCCEEDED, stored(result), None
        else:
            code, message = error
            status, stored_result, stored_error = JobStatus.FAILED, None, stored(JobError(code=code, message=message))
        params.append({"b_id": claim.job_id, "b_attempt": claim.attempt, "b_status": status,
                       "b_result": stored_result, "b_error": stored_error})  # fmt: skip
    if params:
        now = utcnow()
        session.execute(
            update(table)
            .where(
                table.c.id == bindparam("b_id"),
                table.c.attempt == bindparam("b_attempt"),
                table.c.status == JobStatus.RUNNING,
            )
            .values(
                status=bindparam("b_status", type_=table.c.status.type),
                result=bindparam("b_result", type_=table.c.result.type),
                error=bindparam("b_error", type_=table.c.error.type),
                finished_at=now,
                updated_at=now,
                lease_expires_at=None,
            ),
            params,
        )
    session.commit()
    written = [claim.job_id in current for claim, _ in outcomes]
    for claim, (_, error) in outcomes:
        if claim.job_id in current:
            JOBS_FINISHED.labels(
                claim.job.kind, (JobStatus.SUCCEEDED if error is None else JobStatus.FAILED).value
            ).inc()
    return written


def succeed(session: Session, claim: Claim, result: JobResult, *, add: Sequence[object] = ()) -> bool:
    """Marks a claimed job succeeded with its result; False when the claim is no longer current.

    Rows in add (e.g. the fine-tuned model a fine-tune produced) are inserted in the same transaction,
    and only when the claim is still current, so a result and its rows appear together or not at all.
    """
    return _finish(session, claim, JobStatus.SUCCEEDED, add=add, result=stored(result))


def fail(session: Session, claim: Claim, code: ErrorCode, message: str) -> bool:
    """Marks a claimed job failed with a readable error; False when the claim is no longer current."""
    return _finish(session, claim, JobStatus.FAILED, error=stored(JobError(code=code, message=message)))


def finish_cancelled(session: Session, claim: Claim, result: JobResult | None = None) -> bool:
    """Marks a claimed job whose cancel was requested as cancelled, keeping any partial result."""
    return _finish(session, claim, JobStatus.CANCELLED, result=stored(result) if result is not None else None)


def hand_back(session: Session, claim: Claim) -> bool:
    """A stopping worker gives its running job back to the queue at once (no lease to wait out), and commits.

    The attempt it ran is not counted against max_attempts: a drain is not a failure. False when the claim is
    no longer current. The caller sends the job's message again.
    """
    now = utcnow()
    done = session.execute(
        update(Job)
        .where(Job.id == claim.job_id, Job.attempt == claim.attempt, Job.status == JobStatus.RUNNING)
        .values(status=JobStatus.QUEUED, lease_expires_at=None, published_at=now, updated_at=now,
                max_attempts=Job.max_attempts + 1)
    )  # fmt: skip
    session.commit()
    return bool(done.rowcount == 1)  # type: ignore[attr-defined]


def cancel(session: Session, job_id: str) -> Job | None:
    """Cancels a job for a client and commits: a queued or paused job at once, a running one at its next step.

    Returns the job as it stands afterwards, or None when there is no such job.
    """
    now = utcnow()
    cancelled = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_([JobStatus.QUEUED, JobStatus.PAUSED]))
        .values(status=JobStatus.CANCELLED, finished_at=now, updated_at=now, cancel_requested=True)
        .returning(Job.kind)
    ).scalar_one_or_none()
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING)
        .values(cancel_requested=True, updated_at=now)
    )
    session.commit()
    if cancelled is not None:
        JOBS_FINISHED.labels(cancelled, JobStatus.CANCELLED.value).inc()
    return session.get(Job, job_id, populate_existing=True)


BATCH_PRIORITY = -10  # claim priority of a batch request: interactive jobs (0) of its base model go first


def create_batch_request(
    session: Session,
    *,
    batch_id: str,
    custom_id: str,
    line: int,
    model: str,
    base_model: str,
    params: JobParams,
    max_attempts: int,
    tenant: str,
) -> Job:
    """A new queued generation job for one line of a batch, at batch priority; added, not committed."""
    row = create_job(
        session,
        kind="generate",
        model=model,
        base_model=base_model,
        params=params,
        max_attempts=max_attempts,
        tenant=tenant,
    )
    row.priority, row.batch_id, row.custom_id, row.batch_line = BATCH_PRIORITY, batch_id, custom_id, line
    return row


def cancel_batch(session: Session, batch_id: str) -> None:
    """Cancels every job of a batch (not committed): queued ones at once, running ones when their worker next looks."""
    now = utcnow()
    session.execute(
        update(Job)
        .where(Job.batch_id == batch_id, Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.CANCELLED, finished_at=now, updated_at=now, cancel_requested=True)
    )
    _update_in_id_order(session, (Job.batch_id == batch_id, Job.status == JobStatus.RUNNING),
                        cancel_requested=True, updated_at=now)  # fmt: skip


def _update_in_id_order(session: Session, where: tuple[ColumnElement[bool], ...], **values: object) -> list[str]:
    """Sets values on the rows that match, locking them first (FOR UPDATE, in this transaction) in the order of
    their ids; the ids of the rows it changed (not committed).

    Every statement that locks several running jobs takes them in that order (a worker's write-back and its lease
    renewal, a batch's cancel, the reaper), so no two of them can wait for each other in a cycle: Postgres breaks
    such a deadlock by failing one of them, and a failed write-back ends the worker's whole continuous batch."""
    locked = list(session.scalars(select(Job.id).where(*where).order_by(Job.id).with_for_update()))
    if not locked:
        return []
    return list(session.scalars(update(Job).where(Job.id.in_(locked), *where).values(**values).returning(Job.id)))


def pause(session: Session, job_id: str) -> Job | None:
    """Pauses a fine-tune for a client and commits: a queued one at once, a running one at its next step (its
    worker checkpoints there and lets go: finish_paused). The job as it stands afterwards, or None.

    The caller checks that the job is queued or running; any other status is left as it is.
    """
    now = utcnow()
    queued, running = Job.status == JobStatus.QUEUED, Job.status == JobStatus.RUNNING
    session.execute(update(Job).where(Job.id == job_id, queued).values(status=JobStatus.PAUSED, updated_at=now))
    session.execute(update(Job).where(Job.id == job_id, running).values(pause_requested=True, updated_at=now))
    session.commit()
    return session.get(Job, job_id, populate_existing=True)


def finish_paused(session: Session, claim: Claim, result: JobResult) -> bool:
    """Marks a claimed job whose pause was requested as paused (not final: no finished_at), keeping where it
    stopped, and commits; False when the claim is no longer current."""
    done = session.execute(
        update(Job)
        .where(_holds(claim))
        .values(
            status=JobStatus.PAUSED,
            pause_requested=False,
            lease_expires_at=None,
            worker=None,
            result=stored(result),
            updated_at=utcnow(),
        )
    )
    if done.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        return False
    session.commit()
    return True


def resume(session: Session, job_id: str) -> Job | None:
    """Queues a paused job again and commits (the caller then enqueues its id); the job afterwards, or None.

    A pause is not a failure: the attempt it ended is given back (max_attempts grows by one), so pausing
    often never uses up the attempts that protect against a job that crashes its workers.
    """
    now = utcnow()
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.PAUSED)
        .values(
            status=JobStatus.QUEUED,
            published_at=now,
            updated_at=now,
            max_attempts=case((Job.attempt > 0, Job.max_attempts + 1), else_=Job.max_attempts),
        )
    )
    session.commit()
    return session.get(Job, job_id, populate_existing=True)


def _holds(claim: Claim) -> ColumnElement[bool]:
    """SQL condition: the claim is still the job's current, running attempt."""
    return (Job.id == claim.job_id) & (Job.attempt == claim.attempt) & (Job.status == JobStatus.RUNNING)


def renew_lease(session: Session, claim: Claim, lease_seconds: float) -> bool:
    """Extends the claim's lease (a heartbeat) and commits; False when the claim was lost."""
    now = utcnow()
    renewed = session.execute(
        update(Job).where(_holds(claim)).values(lease_expires_at=now + timedelta(seconds=lease_seconds))
    )
    session.commit()
    return bool(renewed.rowcount == 1)  # type: ignore[attr-defined]


def renew_leases(session: Session, claims: Sequence[Claim], lease_seconds: float) -> set[str]:
    """Extends the leases of these claims (locked in id order, then one UPDATE) and commits; the ids of those whose
    claim was lost."""
    if not claims:
        return set()
    now = utcnow()
    held = tuple_(Job.id, Job.attempt).in_([(c.job_id, c.attempt) for c in claims]), Job.status == JobStatus.RUNNING
    renewed = _update_in_id_order(session, held, lease_expires_at=now + timedelta(seconds=lease_seconds))
    session.commit()
    return {c.job_id for c in claims} - set(renewed)


def record_progress(session: Session, claim: Claim, result: JobResult) -> bool:
    """Replaces the running job's partial result (progress figures) and commits; False if lost."""
    done = session.execute(update(Job).where(_holds(claim)).values(result=stored(result), updated_at=utcnow()))
    session.commit()
    return bool(done.rowcount == 1)  # type: ignore[attr-defined]


def cancel_requested(session: Session, claim: Claim) -> bool:
    """True when a client asked to cancel the job, or the claim is no longer current."""
    row = session.execute(
        select(Job.cancel_requested, Job.attempt, Job.status).where(Job.id == claim.job_id)
    ).one_or_none()
    session.rollback()
    return row is None or row.cancel_requested or row.attempt != claim.attempt or row.status != JobStatus.RUNNING


def cancels_requested(session: Session, claims: Sequence[Claim]) -> set[str]:
    """Ids of the claimed jobs that a client asked to cancel or whose claim is no longer current (one query)."""
    if not claims:
        return set()
    attempts = {c.job_id: c.attempt for c in claims}
    rows = session.execute(
        select(Job.id, Job.cancel_requested, Job.attempt, Job.status).where(Job.id.in_(attempts))
    ).all()
    session.rollback()
    current = {
        r.id for r in rows if not r.cancel_requested and r.attempt == attempts[r.id] and r.status == JobStatus.RUNNING
    }
    return set(attempts) - current


StopRequest = Literal["cancel", "pause"]


def stop_request(session: Session, claim: Claim) -> StopRequest | None:
    """What a client asked a running job to do at its next step: "cancel" (also when the claim is no longer
    current), "pause", or None. One read, checked by the train worker after every step."""
    row = session.execute(
        select(Job.cancel_requested, Job.pause_requested, Job.attempt, Job.status).where(Job.id == claim.job_id)
    ).one_or_none()
    session.rollback()
    if row is None or row.cancel_requested or row.attempt != claim.attempt or row.status != JobStatus.RUNNING:
        return "cancel"
    return "pause" if row.pause_requested else None


def add_event(
    session: Session,
    claim: Claim,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    data: Mapping[str, object] | None = None,
) -> bool:
    """Appends an event to the claimed job's history (only while the claim is current) and commits."""
    values = {
        "job_id": claim.job_id,
        "attempt": claim.attempt,
        "created_at": utcnow(),
        "level": level,
        "type": type,
        "message": scrub(message)[:2000],  # may quote a prompt or an exception: text a row can hold
        "data": dict(data) if data is not None else None,
    }
    columns = list(values)
    guarded = select(*[literal(v, type_=JobEvent.__table__.c[k].type) for k, v in values.items()]).where(
        exists().where(_holds(claim))
    )
    # preserve_rowcount: SQLAlchemy keeps rowcount of UPDATE and DELETE only; without it an INSERT's result
    # is closed first and psycopg reports -1, so on Postgres every event looked like a lost claim.
    done = session.execute(
        insert(JobEvent).from_select(columns, guarded), execution_options={"preserve_rowcount": True}
    )
    session.commit()
    return bool(done.rowcount == 1)  # type: ignore[attr-defined]


def note(session: Session, job: Job, message: str, *, level: str = "info") -> None:
    """Adds a gateway-side event (created, cancel requested) to the session; the caller commits."""
    session.add(
        JobEvent(
            job_id=job.id,
            attempt=job.attempt,
            created_at=utcnow(),
            level=level,
            type="message",
            message=message,
        )
    )
    session.flush()


def add_checkpoint(
    session: Session,
    claim: Claim,
    step: int,
    path: str,
    metrics: Figures,
    *,
    on_disk: Callable[[str], bool] | None = None,
) -> bool:
    """Records a complete checkpoint of the claimed job (only while the claim is current) and commits.

    on_disk says whether a recorded checkpoint's folder still exists; in the same transaction the rows of
    those that are gone (rotated out by the Trainer's save_total_limit) are deleted, so the job lists
    only checkpoints that are on disk.
    """
    # FOR UPDATE (Postgres): the claim cannot be taken over between this check and the commit.
    if session.execute(select(Job.id).where(_holds(claim)).with_for_update()).first() is None:
        session.rollback()
        return False
    if on_disk is not None:
        recorded = session.execute(select(Checkpoint.id, Checkpoint.path).where(Checkpoint.job_id == claim.job_id))
        gone = [row.id for row in recorded if not on_disk(row.path)]
        if gone:
            session.execute(delete(Checkpoint).where(Checkpoint.id.in_(gone)))
    session.add(
        Checkpoint(
            id=new_id("ftckpt"),
            job_id=claim.job_id,
            step=step,
            path=path,
            metrics=metrics,
            created_at=utcnow(),
        )
    )
    session.commit()
    return True


def requeue_expired(session: Session) -> list[Job]:
    """Hands running jobs whose lease expired back to the queue (attempts left) and commits; those jobs."""
    now = utcnow()
    expired = Job.status == JobStatus.RUNNING, Job.lease_expires_at < now, Job.attempt < Job.max_attempts
    ids = _update_in_id_order(session, expired, status=JobStatus.QUEUED, lease_expires_at=None, published_at=now,
                              updated_at=now)  # fmt: skip
    session.commit()
    return list(session.scalars(select(Job).where(Job.id.in_(ids)))) if ids else []


def fail_exhausted(session: Session) -> list[str]:
    """Ends failed the running jobs whose lease expired on their last attempt, and commits; their ids."""
    now = utcnow()
    exhausted = Job.status == JobStatus.RUNNING, Job.lease_expires_at < now, Job.attempt >= Job.max_attempts
    error = JobError(
        code=ErrorCode.MAX_ATTEMPTS_EXCEEDED,
        message="the worker running this job stopped answering on every attempt (the job may crash its worker)",
    )
    ids = _update_in_id_order(session, exhausted, status=JobStatus.FAILED, finished_at=now, updated_at=now,
                              lease_expires_at=None, error=stored(error))  # fmt: skip
    session.commit()
    return ids


def queued_counts(session: Session) -> dict[str, int]:
    """How many jobs of each kind are queued (kinds with none are left out)."""
    rows = session.execute(
        select(Job.kind, func.count()).where(Job.status == JobStatus.QUEUED).group_by(Job.kind)
    ).all()
    session.rollback()
    return {kind: int(count) for kind, count in rows}


def unpublished(
    session: Session, older_than_seconds: float, limit: int = 1000, *, kind: str | None = None
) -> list[Job]:
    """The oldest queued jobs (of a kind, or all) whose last message is older than this (it may be lost),
    at most limit; marks them published and commits."""
    now = utcnow()
    stale = (Job.status == JobStatus.QUEUED) & (Job.published_at < now - timedelta(seconds=older_than_seconds))
    if kind is not None:
        stale = stale & (Job.kind == kind)
    oldest = select(Job.id).where(stale).order_by(Job.created_at, Job.id).limit(limit)
    ids = session.scalars(
        update(Job).where(stale, Job.id.in_(oldest.scalar_subquery())).values(published_at=now).returning(Job.id)
    ).all()
    session.commit()
    if not ids:
        return []
    return list(session.scalars(select(Job).where(Job.id.in_(ids)).order_by(Job.created_at, Job.id)))
