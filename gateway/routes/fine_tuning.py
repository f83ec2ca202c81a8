"""Fine-tuning jobs in the OpenAI shape: create, list, read, cancel, pause, resume, events, checkpoints."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import and_, or_, select

from gateway import owned, views
from gateway.auth import TenantDep
from gateway.deps import SessionDep, SettingsDep
from gateway.errors import BODY_ERRORS, V1_ERRORS, JobStateConflict, documented
from gateway.fine_tuning_checks import check_fine_tuning_request
from gateway.queue_state import queue_state
from gateway.submission import submit
from shared import job_states, statuses
from shared.celery_app import enqueue_after_commit
from shared.job_data import FineTuneParams
from shared.models import Checkpoint, Job, JobEvent
from shared.schemas import (
    FineTuningCheckpointList,
    FineTuningEventList,
    FineTuningJob,
    FineTuningJobList,
    FineTuningJobRequest,
)
from shared.statuses import JobStatus

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], responses=V1_ERRORS)


@router.post("", response_model=FineTuningJob, responses=BODY_ERRORS)
def create_fine_tuning_job(
    body: FineTuningJobRequest, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> FineTuningJob:
    """Queues a fine-tune of a base model, or a continued fine-tune of one of the tenant's fine-tuned models or
    checkpoints, on an uploaded file (or a hub dataset)."""
    dataset, base_model = check_fine_tuning_request(body, session, settings, tenant)
    params = FineTuneParams(
        training_file=body.training_file,
        validation_file=body.validation_file,
        dataset=dataset.model_dump() if dataset else None,
        suffix=body.suffix,
        seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
        metadata=body.metadata,
        hyperparameters=body.chosen_hyperparameters().resolved().model_dump(),
        parent_model=body.model if body.model != base_model else None,
    )
    job = submit(
        session,
        settings,
        kind="train",
        model=body.model,
        base_model=base_model,
        params=params,
        tenant=tenant,
        event="Created fine-tuning job",
    )
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
        cursor = owned.job_or_404(session, tenant, after, kind="train")
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
    job = owned.job_or_404(session, tenant, job_id, kind="train")
    return views.fine_tuning_job(job).model_copy(update={"queue": queue_state(session, job)})


@router.post("/{job_id}/cancel", response_model=FineTuningJob, responses=documented(404))
def cancel_fine_tuning_job(job_id: str, session: SessionDep, tenant: TenantDep) -> FineTuningJob:
    """Cancels a job: a queued one at once, a running one after its current step (keeping its checkpoints)."""
    job = owned.job_or_404(session, tenant, job_id, kind="train")
    if not statuses.is_terminal(job.status):
        job_states.note(session, job, "Cancellation requested")
    cancelled = job_states.cancel(session, job_id)
    assert cancelled is not None
    return views.fine_tuning_job(cancelled)


@router.post("/{job_id}/pause", response_model=FineTuningJob, responses=documented(404, 409))
def pause_fine_tuning_job(job_id: str, session: SessionDep, tenant: TenantDep) -> FineTuningJob:
    """Pauses a fine-tune: a queued one at once; a running one checkpoints at the end of its current step and
    frees its worker (status `paused`). 409 for any other status."""
    job = owned.job_or_404(session, tenant, job_id, kind="train")
    if job.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
        raise JobStateConflict(f"fine-tuning job {job_id!r} is {job.status}; only a queued or running job can pause")
    job_states.note(session, job, "Pause requested")
    paused = job_states.pause(session, job_id)
    assert paused is not None
    return views.fine_tuning_job(paused)


@router.post("/{job_id}/resume", response_model=FineTuningJob, responses=documented(404, 409))
def resume_fine_tuning_job(job_id: str, session: SessionDep, tenant: TenantDep) -> FineTuningJob:
    """Queues a paused fine-tune again: any train worker continues it from its checkpoint (weights, optimizer,
    scheduler, RNG state, data position). 409 unless it is paused."""
    job = owned.job_or_404(session, tenant, job_id, kind="train")
    if job.status != JobStatus.PAUSED:
        raise JobStateConflict(f"fine-tuning job {job_id!r} is {job.status}; only a paused job can resume")
    job_states.note(session, job, "Resume requested")
    resumed = job_states.resume(session, job_id)
    assert resumed is not None
    if resumed.status == JobStatus.QUEUED:
        enqueue_after_commit("train", job_id)
    return views.fine_tuning_job(resumed)


@router.get("/{job_id}/events", response_model=FineTuningEventList, responses=documented(404))
def list_fine_tuning_events(
    job_id: str,
    session: SessionDep,
    tenant: TenantDep,
    after: Annotated[str | None, Query(description="Id of the last event of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> FineTuningEventList:
    """The job's events, newest first."""
    owned.job_or_404(session, tenant, job_id, kind="train")
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
    job = owned.job_or_404(session, tenant, job_id, kind="train")
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
