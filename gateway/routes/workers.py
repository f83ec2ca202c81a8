"""GET /v1/workers: the worker processes, live or not, with kind, host, model and the jobs they run (operator)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from gateway.deps import SessionDep, SettingsDep
from gateway.routes.metrics import CLOSED, require_operator
from shared import workers
from shared.models import utcnow
from shared.schemas import ErrorResponse, WorkerList, WorkerObject

router = APIRouter(prefix="/v1/workers", tags=["operations"])


@router.get("", response_model=WorkerList, responses={401: {"model": ErrorResponse, "description": CLOSED}})
def list_workers(request: Request, session: SessionDep, settings: SettingsDep) -> WorkerList:
    """Every registered worker: live while its heartbeat is younger than worker_stale_seconds. Opened by the
    metrics token (Authorization: Bearer <metrics_token>), like /metrics; not by a tenant's API key."""
    require_operator(request, settings, "/v1/workers")
    now = utcnow()
    data = [
        WorkerObject(
            id=row.id,
            kind=row.kind,
            host=row.host,
            pid=row.pid,
            model=row.model,
            current_jobs=list(row.current_jobs.get("ids", [])),
            draining=row.draining,
            live=workers.is_live(row, settings.worker_stale_seconds, now),
            started_at=row.started_at,
            heartbeat_at=row.heartbeat_at,
            heartbeat_age_seconds=round((now - row.heartbeat_at).total_seconds(), 3),
        )
        for row in workers.listed(session)
    ]
    return WorkerList(data=data)
