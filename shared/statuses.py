"""Job statuses: what a client may see, and which of them are final."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PAUSED = "paused"  # a fine-tune stopped at a checkpoint by its owner, until resumed (not final)


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


def is_terminal(status: str) -> bool:
    """True when a job in this status will never change again."""
    return status in TERMINAL
