"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from shared import workers
from shared.celery_app import get_celery
from shared.db import get_engine, get_sessionmaker, ping
from shared.schemas import Readiness
from shared.settings import get_settings

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive; `instance` names this gateway when its starter gave it a name (instance_id)."""
    instance = get_settings().instance_id
    return {"status": "ok", "instance": instance} if instance else {"status": "ok"}


def _check_database() -> str:
    try:
        ping(get_engine())
        return "ok"
    except Exception as exc:
        return f"unreachable: {type(exc).__name__}"


def _check_broker() -> str:
    try:
        with get_celery().connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
        return "ok"
    except Exception as exc:
        return f"unreachable: {type(exc).__name__}"


def _check_workers() -> str:
    """ok, or degraded naming each kind with no live worker (its jobs wait until one starts)."""
    try:
        with get_sessionmaker()() as session:
            live = workers.live_kinds(session, get_settings().worker_stale_seconds)
    except Exception as exc:
        return f"unknown: {type(exc).__name__}"
    missing = [kind for kind, count in live.items() if count == 0]
    return "ok" if not missing else "degraded: no live " + " or ".join(missing) + " worker"


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz() -> JSONResponse:
    """The database and the broker answer (else 503 naming the part that does not); `degraded` (still 200: the
    gateway takes jobs) names a job kind no live worker will run."""
    checks = {
        "database": await run_in_threadpool(_check_database),
        "broker": await run_in_threadpool(_check_broker),
    }
    ready = all(v == "ok" for v in checks.values())
    checks["workers"] = await run_in_threadpool(_check_workers) if ready else "unknown"
    status = "unavailable" if not ready else "ok" if checks["workers"] == "ok" else "degraded"
    body = Readiness(status=status, checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)
