"""Writes of a claimed fine-tune that stop its attempt when another attempt owns the job.

shared.job_states guards every write by the claimed attempt and answers False when the claim is gone (the
lease expired and the reaper handed the job on). Outside the Trainer's loop that ends the attempt at once:
these raise ClaimLost, which the job runner catches without touching the row again.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from shared import job_states
from shared.job_states import Claim
from shared.settings import Settings


class ClaimLost(Exception):
    """Another attempt owns the job now (the lease expired); this worker must stop writing to it."""


def add_event(
    session: Session, claim: Claim, message: str, *, type: str = "message", data: dict[str, Any] | None = None
) -> None:
    """Adds an event to the claimed job; raises ClaimLost if the claim is gone."""
    if not job_states.add_event(session, claim, message, type=type, data=data):
        raise ClaimLost(claim.job_id)


def renew_lease(session: Session, claim: Claim, settings: Settings) -> None:
    """Renews the claimed job's lease; raises ClaimLost if the claim is gone."""
    if not job_states.renew_lease(session, claim, settings.lease_seconds):
        raise ClaimLost(claim.job_id)
