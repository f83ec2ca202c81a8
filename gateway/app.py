"""The FastAPI gateway: validates requests, writes job rows, enqueues job ids. Never imports torch."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI

from gateway import errors
from gateway.routes import completions, files, fine_tuning, generations, health, jobs, models
from gateway.waiting import FinishedJobs
from shared.notify import redis_url


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    url = redis_url()
    finished_jobs = FinishedJobs(url)
    app.state.finished_jobs = finished_jobs
    app.state.redis = aioredis.Redis.from_url(url) if url else None  # streaming subscriptions
    await finished_jobs.start()
    try:
        yield
    finally:
        await finished_jobs.stop()
        if app.state.redis is not None:
            await app.state.redis.aclose()


def create_app() -> FastAPI:
    """The gateway application."""
    logging.basicConfig(level=logging.INFO)
    app = FastAPI(title="llmq", version="0.1.0", lifespan=_lifespan)
    errors.install(app)
    app.include_router(health.router)
    app.include_router(generations.router)
    app.include_router(completions.router)
    app.include_router(jobs.router)
    app.include_router(files.router)
    app.include_router(fine_tuning.router)
    app.include_router(models.router)
    return app
