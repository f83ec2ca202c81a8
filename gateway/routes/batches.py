"""OpenAI's Batch API: create a batch from an input file (purpose batch), read, list and cancel it."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from gateway import batches
from gateway.auth import TenantDep
from gateway.deps import SessionDep, SettingsDep
from gateway.errors import BODY_ERRORS, V1_ERRORS, documented
from shared.batch_schemas import BatchError, BatchErrors, BatchList, BatchObject, BatchRequest, BatchRequestCounts
from shared.models import Batch
from shared.settings import Settings

router = APIRouter(prefix="/v1/batches", tags=["batches"], responses=V1_ERRORS)


def _unix(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment is not None else None


def batch_object(session: Session, row: Batch) -> BatchObject:
    """A batch row in OpenAI's shape, with its request counts so far."""
    completed, failed = batches.counts(session, row)
    refused = row.line_errors.get("data", [])
    errors = BatchErrors(data=[BatchError(code=e["code"], message=e["message"], line=e["line"]) for e in refused])
    return BatchObject(
        id=row.id,
        endpoint=row.endpoint,
        errors=errors if refused else None,
        input_file_id=row.input_file_id,
        completion_window=row.completion_window,
        status=row.status,
        output_file_id=row.output_file_id,
        error_file_id=row.error_file_id,
        created_at=int(row.created_at.timestamp()),
        in_progress_at=_unix(row.in_progress_at),
        expires_at=_unix(row.expires_at),
        finalizing_at=_unix(row.finalizing_at),
        completed_at=_unix(row.completed_at),
        failed_at=_unix(row.failed_at),
        cancelling_at=_unix(row.cancelling_at),
        cancelled_at=_unix(row.cancelled_at),
        expired_at=_unix(row.expired_at),
        request_counts=BatchRequestCounts(total=row.total, completed=completed, failed=failed),
        metadata=row.batch_metadata,
    )


def _current(session: Session, settings: Settings, row: Batch) -> BatchObject:
    return batch_object(session, batches.finalize_if_done(session, settings, row))


@router.post("", response_model=BatchObject, responses={**BODY_ERRORS, **documented(404, 409)})
def create_batch(body: BatchRequest, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> BatchObject:
    """Checks every line of the input file and queues a generation job per valid line, below interactive
    jobs; bad lines go to the error file with their line numbers."""
    return batch_object(session, batches.create(session, settings, tenant, body))


@router.get("", response_model=BatchList, responses=documented(404))
def list_batches(
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(description="Id of the last batch of the previous page.")] = None,
) -> BatchList:
    """The tenant's batches newest first, a page at a time."""
    query = select(Batch).where(Batch.tenant == tenant).order_by(Batch.created_at.desc(), Batch.id.desc())
    if after is not None:
        cursor = batches.batch_or_404(session, tenant, after)
        query = query.where(
            or_(Batch.created_at < cursor.created_at, and_(Batch.created_at == cursor.created_at, Batch.id < cursor.id))
        )
    rows = session.scalars(query.limit(limit + 1)).all()
    data = [_current(session, settings, row) for row in rows[:limit]]
    first, last = (data[0].id, data[-1].id) if data else (None, None)
    return BatchList(data=data, first_id=first, last_id=last, has_more=len(rows) > limit)


@router.get("/{batch_id}", response_model=BatchObject, responses=documented(404))
def get_batch(batch_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> BatchObject:
    """One batch; finalized (output and error files written) once none of its requests is left to run."""
    return _current(session, settings, batches.batch_or_404(session, tenant, batch_id))


@router.post("/{batch_id}/cancel", response_model=BatchObject, responses=documented(404, 409))
def cancel_batch(batch_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> BatchObject:
    """Cancels a batch: cancelling until its running requests stop, then cancelled (finished answers kept)."""
    row = batches.batch_or_404(session, tenant, batch_id)
    return batch_object(session, batches.cancel(session, settings, row))
