"""The reaper: returns jobs of dead workers to the queue and re-sends messages that were lost.

Delivery through the broker is at least once and a message can vanish (Redis restarted empty, a
crash between commit and publish, a worker killed with its message unacknowledged). The database
stays the source of truth: every step here is a conditional UPDATE, so any number of reapers can
run at once, and a repeated message only finds its job no longer queued.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from shared import job_states
from shared.celery_app import enqueue
from shared.notify import publish_finished
from shared.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Reaped:
    """What one pass did."""

    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    republished: list[str] = field(default_factory=list)


def reap_once(session: Session, settings: Settings) -> Reaped:
    """One pass: expired leases back to the queue (or failed after max_attempts), lost messages re-sent."""
    reaped = Reaped()
    for job in job_states.requeue_expired(session):
        log.warning("lease of %s (attempt %d) expired; requeued", job.id, job.attempt)
        enqueue(job.kind, job.id)
        reaped.requeued.append(job.id)
    reaped.failed = job_states.fail_exhausted(session)
    if reaped.failed:
        log.warning("failed after max attempts: %s", ", ".join(reaped.failed))
        publish_finished(reaped.failed)
    for job in job_states.unpublished(session, settings.republish_after_seconds):
        enqueue(job.kind, job.id)
        reaped.republished.append(job.id)
    if reaped.republished:
        log.info("re-sent messages of %d queued jobs", len(reaped.republished))
    return reaped
