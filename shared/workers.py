"""Worker registration and liveness: each worker process keeps a row fresh (worker/health.py); readers ask who
is alive. A worker is live while its heartbeat is younger than `worker_stale_seconds`; a worker that stops
cleanly removes its row, one that dies leaves it to go stale (and it is deleted after an hour of silence).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from shared.models import Job, Worker, utcnow
from shared.statuses import JobStatus

KINDS = ("generate", "train")
FORGET_AFTER = timedelta(hours=1)


@dataclass(frozen=True)
class Beat:
    """What one heartbeat of a worker says about it."""

    id: str
    kind: str
    host: str
    pid: int
    model: str
    jobs: Sequence[str]
    draining: bool = False


def heartbeat(session: Session, beat: Beat) -> None:
    """Records a worker's heartbeat (registering it on the first) and commits."""
    now = utcnow()
    values = {"current_jobs": {"ids": list(beat.jobs)}, "draining": beat.draining, "heartbeat_at": now}
    updated = session.execute(update(Worker).where(Worker.id == beat.id).values(**values))
    if updated.rowcount == 0:  # type: ignore[attr-defined]
        session.add(Worker(id=beat.id, kind=beat.kind, host=beat.host, pid=beat.pid, model=beat.model,
                           started_at=now, **values))  # fmt: skip
    session.execute(delete(Worker).where(Worker.heartbeat_at < now - FORGET_AFTER))
    session.commit()


def deregister(session: Session, worker_id: str) -> None:
    """Removes a worker that stops cleanly, and commits."""
    session.execute(delete(Worker).where(Worker.id == worker_id))
    session.commit()


def listed(session: Session) -> list[Worker]:
    """Every registered worker (live or stale), by kind then id."""
    return list(session.scalars(select(Worker).order_by(Worker.kind, Worker.id)))


def is_live(worker: Worker, stale_seconds: float, now: datetime | None = None) -> bool:
    return worker.heartbeat_at >= (now or utcnow()) - timedelta(seconds=stale_seconds)


def live_kinds(session: Session, stale_seconds: float) -> dict[str, int]:
    """Live workers per kind (every kind named, 0 when none is live)."""
    since = utcnow() - timedelta(seconds=stale_seconds)
    rows = session.execute(
        select(Worker.kind, func.count()).where(Worker.heartbeat_at >= since, Worker.draining.is_(False))
        .group_by(Worker.kind)
    ).all()  # fmt: skip
    counts = dict.fromkeys(KINDS, 0)
    counts.update({kind: int(count) for kind, count in rows})
    return counts


def queue_position(session: Session, job: Job) -> int | None:
    """A queued job's place in its queue (1: next to be claimed), counting older queued jobs of its kind and base
    model; None when it is not queued."""
    if job.status != JobStatus.QUEUED:
        return None
    ahead = session.scalar(
        select(func.count()).select_from(Job).where(
            Job.kind == job.kind, Job.status == JobStatus.QUEUED, Job.base_model == job.base_model,
            Job.created_at < job.created_at,
        )
    )  # fmt: skip
    return int(ahead or 0) + 1
