"""Listing jobs of every kind, newest first."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import and_, or_, select

from gateway import owned, views
from gateway.auth import TenantDep
from gateway.deps import SessionDep
from gateway.errors import V1_ERRORS, documented
from gateway.queue_state import queue_state
from shared.job_data import JobKind
from shared.models import Job
from shared.schemas import JobList, JobSummary
from shared.statuses import JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=V1_ERRORS)


@router.get("", response_model=JobList, responses=documented(404))
def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    kind: JobKind | None = None,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(description="Id of the last job of the previous page.")] = None,
) -> JobList:
    """Jobs newest first, a page at a time, optionally of one kind and status."""
    query = select(Job).where(Job.tenant == tenant).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    if kind is not None:
        query = query.where(Job.kind == kind)
    if status is not None:
        query = query.where(Job.status == status)
    if after is not None:
        cursor = owned.job_or_404(session, tenant, after)
        query = query.where(
            or_(
                Job.created_at < cursor.created_at,
                and_(Job.created_at == cursor.created_at, Job.id < cursor.id),
            )
        )
    jobs = session.scalars(query).all()
    return JobList(data=views.readable(jobs[:limit], views.job_summary), has_more=len(jobs) > limit)


@router.get("/{job_id}", response_model=JobSummary, responses=documented(404))
def get_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobSummary:
    """One job of any kind."""
    job = owned.job_or_404(session, tenant, job_id)
    return views.job_summary(job).model_copy(update={"queue": queue_state(session, job)})
