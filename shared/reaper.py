"""The reaper: returns jobs of dead workers to the queue and re-sends messages that were lost.

Delivery through the broker is at least once and a message can vanish (Redis restarted empty, a
crash between commit and publish, a worker killed with its message unacknowledged). The database
stays the source of truth: every step here is a conditional UPDATE, so any number of reapers can
run at once, and a repeated message only finds its job no longer queued.

Lost-message repair re-sends only what may really be lost. A generate message names no job a worker
must run: any one makes a worker claim the oldest queued jobs of its base model. So while the
broker holds at least as many generate messages as there are queued generate jobs, none is lost,
however long the backlog waits; when it holds fewer, the missing number is re-sent, for the oldest
jobs whose last message is older than republish_after_seconds. A train message runs the one job it
names, so counting cannot tell whose message is missing: every train job queued that long gets
another (fine-tunes are few, and a duplicate finds its job no longer queued).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from shared import job_states
from shared.celery_app import enqueue, waiting_messages
from shared.notify import publish_finished
from shared.settings import Settings
from shared.tenant_counts import fold_piled_up

log = logging.getLogger(__name__)


@dataclass
class Reaped:
    """What one pass did."""

    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    republished: list[str] = field(default_factory=list)
    folded: dict[str, int] = field(default_factory=dict)  # tenants whose piled-up count changes were folded


def reap_once(session: Session, settings: Settings) -> Reaped:
    """One pass: expired leases back to the queue (or failed after max_attempts), lost messages re-sent, piled-up
    changes of the tenants' active-job counts folded (shared.tenant_counts)."""
    reaped = Reaped()
    for job in job_states.requeue_expired(session):
        log.warning("lease of %s (attempt %d) expired; requeued", job.id, job.attempt)
        enqueue(job.kind, job.id)
        reaped.requeued.append(job.id)
    reaped.failed = job_states.fail_exhausted(session)
    if reaped.failed:
        log.warning("failed after max attempts: %s", ", ".join(reaped.failed))
        publish_finished(reaped.failed)
    reaped.republished = _repair_lost_messages(session, settings.republish_after_seconds)
    if reaped.republished:
        log.info("re-sent messages of %d queued jobs", len(reaped.republished))
    reaped.folded = fold_piled_up(session)
    return reaped


# Kinds whose messages are interchangeable: any message serves the oldest queued jobs, not one named job.
COUNTED_KINDS = ("generate",)


def _repair_lost_messages(session: Session, older_than_seconds: float) -> list[str]:
    """Re-sends the messages that may be lost; the ids of the jobs they were sent for."""
    # The broker is counted before the database: a message taken meanwhile then looks present, and its
    # job (claimed meanwhile) is not counted, instead of the reverse, which would look like a loss.
    waiting = {kind: waiting_messages(kind) for kind in COUNTED_KINDS}
    queued = job_states.queued_counts(session)
    sent = []
    for kind in sorted(queued):
        missing = queued[kind] - waiting[kind] if kind in waiting else queued[kind]
        if missing <= 0:
            continue
        for job in job_states.unpublished(session, older_than_seconds, min(missing, 1000), kind=kind):
            enqueue(job.kind, job.id)
            sent.append(job.id)
    return sent
