"""Conversions from job rows to the API's response models."""

from __future__ import annotations

from datetime import datetime

from shared.models import Job
from shared.schemas import ErrorInfo, GenerationJob, GenerationOutput, JobSummary, Usage


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds(), 6)


def generation_job(job: Job) -> GenerationJob:
    """A generation job row as the client sees it."""
    result = job.result or {}
    outputs = [GenerationOutput(**o) for o in result["outputs"]] if "outputs" in result else None
    return GenerationJob(
        id=job.id,
        status=job.status,
        model=job.model,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        queue_seconds=_seconds(job.created_at, job.started_at),
        run_seconds=_seconds(job.started_at, job.finished_at),
        attempt=job.attempt,
        request=job.params,
        outputs=outputs,
        usage=Usage(**result["usage"]) if "usage" in result else None,
        error=ErrorInfo(**job.error) if job.error else None,
    )


def job_summary(job: Job) -> JobSummary:
    """Any job row as one line of a listing."""
    return JobSummary(
        id=job.id,
        kind=job.kind,
        status=job.status,
        model=job.model,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        attempt=job.attempt,
        error=ErrorInfo(**job.error) if job.error else None,
    )
