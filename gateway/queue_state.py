"""Where a queued job stands (its queue position, whether a worker of its kind is alive), for GETs of one job."""

from __future__ import annotations

from sqlalchemy.orm import Session

from shared import workers
from shared.celery_app import QUEUES
from shared.models import Job
from shared.schemas import QueueState
from shared.settings import get_settings
from shared.statuses import JobStatus


def queue_state(session: Session, job: Job) -> QueueState | None:
    """Two small counts for a queued job (served by the claim index and the workers table); None otherwise."""
    if job.status != JobStatus.QUEUED:
        return None
    position = workers.queue_position(session, job) or 1
    # Workers register by the queue they consume: an export waits for a train worker.
    live = workers.live_kinds(session, get_settings().worker_stale_seconds).get(QUEUES[job.kind], 0)
    return QueueState(position=position, live_workers=live, worker_alive=live > 0)
