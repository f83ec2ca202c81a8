"""The FastAPI gateway: validates requests, writes job rows, enqueues job ids. Never imports torch."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import Depends, FastAPI
from fastapi.telemetry import TelemetryConfig
from starlette.concurrency import run_in_threadpool

from gateway import batches as batch_results
from gateway import errors, openapi
from gateway.auth import Authenticate
from gateway.body_limit import BodyLimit
from gateway.closing import close_within
from gateway.front_door import open_front_door
from gateway.hot_routes import HotRoutes
from gateway.log_context import JobLogContext
from gateway.methods import AnswerOptions
from gateway.params import check_params
from gateway.request_metrics import RequestMetrics
from gateway.routes import (
    batches,
    chat,
    completions,
    exports,
    files,
    fine_tuning,
    generations,
    health,
    jobs,
    metrics,
    models,
    workers,
)
from gateway.ui import routes as ui
from gateway.waiting import FinishedJobs
from shared.db import get_sessionmaker
from shared.logging import configure_logging
from shared.notify import redis_url
from shared.reaper import reap_once
from shared.settings import Settings, get_settings

log = logging.getLogger(__name__)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    url = redis_url()
    finished_jobs = FinishedJobs(url)
    app.state.finished_jobs = finished_jobs
    app.state.redis = aioredis.Redis.from_url(url) if url else None  # streaming subscriptions
    await finished_jobs.start()
    app.state.front_door = await open_front_door(get_settings())  # the hot paths' pool and clients
    if not get_settings().require_api_keys:
        log.warning("API keys are not required (LLMQ_REQUIRE_API_KEYS=false): bind this gateway to localhost only")
    elif not get_settings().metrics_token:
        log.warning("LLMQ_METRICS_TOKEN is not set: /metrics answers 401 while API keys are required")
    reaper = asyncio.create_task(_reaper_loop(get_settings())) if get_settings().gateway_runs_reaper else None
    try:
        yield
    finally:
        if reaper is not None:
            reaper.cancel()
        await finished_jobs.stop()
        await close_within(app.state.front_door.close(), "the front door's pool and clients")
        if app.state.redis is not None:
            await close_within(app.state.redis.aclose(), "the streaming Redis client")


def _reap() -> None:
    """One reaper pass: shared.reaper's (leases, lost messages), then the batches that are due to end."""
    with get_sessionmaker()() as session:
        reap_once(session, get_settings())
        settled = batch_results.settle_due(session, get_settings())
    if settled:
        log.info("finalized batches %s", ", ".join(settled))


async def _reaper_loop(settings: Settings) -> None:
    """The reaper, every reaper_interval_seconds, for as long as the gateway runs."""
    while True:
        await asyncio.sleep(settings.reaper_interval_seconds)
        try:
            await run_in_threadpool(_reap)
        except Exception as exc:  # the database or broker may be down; the next pass tries again
            log.warning("reaper pass failed: %s", exc)


def create_app() -> FastAPI:
    """The gateway application."""
    settings = get_settings()
    configure_logging(settings.log_format)
    # FastAPI's OpenTelemetry hooks look for a configured provider on every request; llmq exports none.
    no_telemetry: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}
    app = FastAPI(title="llmq", version="0.1.0", lifespan=_lifespan, telemetry=no_telemetry)
    errors.install(app)
    app.add_middleware(HotRoutes)  # innermost: after the key and the body's limit
    # One megabyte of multipart framing on top of the largest file accepted.
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes, upload_limit=settings.max_upload_bytes + 2**20)
    app.add_middleware(Authenticate)  # outside BodyLimit: a request without a valid key has none of its body read
    app.add_middleware(AnswerOptions, router=app.router)
    app.add_middleware(JobLogContext)
    app.add_middleware(RequestMetrics)  # outermost: every answer counted, 401s included
    app.include_router(health.router)
    for v1 in (generations, completions, chat, jobs, files, fine_tuning, exports, models, batches):
        app.include_router(v1.router, dependencies=[Depends(check_params)])
    app.include_router(metrics.router)
    app.include_router(workers.router)
    app.include_router(ui.router)
    openapi.install(app, settings)
    return app
