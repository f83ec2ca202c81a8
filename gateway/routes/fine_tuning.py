"""Fine-tuning jobs in the OpenAI shape: create, list, read, cancel, events, checkpoints."""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Query
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from gateway import owned, views
from gateway.auth import TenantDep
from gateway.deps import SessionDep, SettingsDep
from gateway.errors import BODY_ERRORS, V1_ERRORS, JobNotFound, documented
from gateway.fine_tuning_checks import check_fine_tuning_request
from gateway.submission import quota_reserved
from shared import job_states, statuses
from shared.celery_app import enqueue_after_commit
from shared.models import Checkpoint, Job, JobEvent
from shared.schemas import (
    FineTuningCheckpointList,
    FineTuningEventList,
    FineTuningJob,
    FineTuningJobList,
    FineTuningJobRequest,
)

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], responses=V1_ERRORS)


def _job(session: Session, tenant: str, job_id: str) -> Job:
    job = owned.job(session, tenant, job_id, kind="train")
    if job is None:
        raise JobNotFound(f"fine-tuning job {job_id!r} not found")
    return job


@router.post("", response_model=FineTuningJob, responses=BODY_ERRORS)
def create_fine_tuning_job(
    body: FineTuningJobRequest, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> FineTuningJob:
    """Queues a fine-tune of the base model on an uploaded file (or a hub dataset)."""
    dataset = check_fine_tuning_request(body, session, settings, tenant)
    params: dict[str, Any] = {
        "training_file": body.training_file,
        "validation_file": body.validation_file,
        "dataset": dataset.model_dump() if dataset else None,
        "suffix": body.suffix,
        "seed": body.seed if body.seed is not None else secrets.randbelow(2**31),
        "metadata": body.metadata,
        "hyperparameters": body.chosen_hyperparameters().resolved().model_dump(),
    }
    with quota_reserved(session, settings, tenant):
        job = job_states.create_job(
            session,
            kind="train",
            tenant=tenant,
            model=body.model,
            base_model=body.model,
            params=params,
            max_attempts=settings.max_attempts,
        )
        job_states.note(session, job, "Created fine-tuning job")
        session.commit()
    enqueue_after_commit("train", job.id)
    return views.fine_tuning_job(job)


@router.get("", response_model=FineTuningJobList, responses=documented(404))
def list_fine_tuning_jobs(
    session: SessionDep,
    tenant: TenantDep,
    after: Annotated[str | None, Query(description="Id of the last job of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> FineTuningJobList:
    """Fine-tuning jobs, newest first."""
    query = select(Job).where(Job.kind == "train", Job.tenant == tenant).order_by(Job.created_at.desc(), Job.id.desc())
    if after is not None:
        cursor = _job(session, tenant, after)
        query = query.where(
            or_(
                Job.created_at < cursor.created_at,
                and_(Job.created_at == cursor.created_at, Job.id < cursor.id),
            )
        )
    jobs = session.scalars(query.limit(limit + 1)).all()
    return FineTuningJobList(data=views.readable(jobs[:limit], views.fine_tuning_job), has_more=len(jobs) > limit)


@router.get("/{job_id}", response_model=FineTuningJob, responses=documented(404))
def get_fine_tuning_job(job_id: str, session: SessionDep, tenant: TenantDep) -> FineTuningJob:
    """One fine-tuning job, with progress while it runs."""
    return views.fine_tuning_job(_job(session, tenant, job_id))


@router.post("/{job_id}/cancel", response_model=FineTuningJob, responses=documented(404))
def cancel_fine_tuning_job(job_id: str, session: SessionDep, tenant: TenantDep) -> FineTuningJob:
    """Cancels a job: a queued one at once, a running one after its current step (keeping its checkpoints)."""
    job = _job(session, tenant, job_id)
    if not statuses.is_terminal(job.status):
        job_states.note(session, job, "Cancellation requested")
    cancelled = job_states.cancel(session, job_id)
    assert cancelled is not None
    return views.fine_tuning_job(cancelled)


@router.get("/{job_id}/events", response_model=FineTuningEventList, responses=documented(404))
def list_fine_tuning_events(
    job_id: str,
    session: SessionDep,
    tenant: TenantDep,
    after: Annotated[str | None, Query(description="Id of the last event of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> FineTuningEventList:
    """The job's events, newest first."""
    _job(session, tenant, job_id)
    query = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc())
    if after is not None:
        query = query.where(JobEvent.id < views.event_number(after))
    events = session.scalars(query.limit(limit + 1)).all()
    return FineTuningEventList(data=views.readable(events[:limit], views.event), has_more=len(events) > limit)


@router.get("/{job_id}/checkpoints", response_model=FineTuningCheckpointList, responses=documented(404))
def list_fine_tuning_checkpoints(
    job_id: str,
    session: SessionDep,
    tenant: TenantDep,
    after: Annotated[str | None, Query(description="Id of the last checkpoint of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> FineTuningCheckpointList:
    """The job's complete checkpoints, newest first."""
    job = _job(session, tenant, job_id)
    query = select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step.desc())
    if after is not None:
        cursor = session.get(Checkpoint, after)
        if cursor is not None:
            query = query.where(Checkpoint.step < cursor.step)
    rows = session.scalars(query.limit(limit + 1)).all()
    data = views.readable(rows[:limit], lambda c: views.checkpoint(job, c))
    return FineTuningCheckpointList(
        data=data,
        has_more=len(rows) > limit,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )
