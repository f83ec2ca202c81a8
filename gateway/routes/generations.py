"""Generation jobs: submit prompts, read (or wait for) their outputs, cancel."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool

from gateway import views
from gateway.catalog import resolve_model
from gateway.deps import SessionDep, SettingsDep
from gateway.errors import JobNotFound
from shared import job_states
from shared.celery_app import enqueue
from shared.db import get_sessionmaker
from shared.models import Job
from shared.schemas import GenerationJob, GenerationRequest
from shared.settings import Settings

router = APIRouter(prefix="/v1/generations", tags=["generations"])
log = logging.getLogger(__name__)


def _check_caps(body: GenerationRequest, settings: Settings) -> None:
    """422 naming the field when a request exceeds a configured cap."""
    errors: list[tuple[tuple[str | int, ...], str]] = []
    if body.max_tokens > settings.max_new_tokens:
        errors.append((("body", "max_tokens"), f"must be at most {settings.max_new_tokens}"))
    prompts = body.prompt_list()
    field = "prompt" if body.prompt is not None else "prompts"
    if len(prompts) > settings.max_prompts_per_job:
        errors.append((("body", field), f"at most {settings.max_prompts_per_job} prompts per job"))
    for i, prompt in enumerate(prompts):
        loc: tuple[str | int, ...] = ("body", field) if body.prompt is not None else ("body", field, i)
        if not prompt:
            errors.append((loc, "prompt must not be empty"))
        elif len(prompt) > settings.max_prompt_chars:
            errors.append((loc, f"prompt longer than {settings.max_prompt_chars} characters"))
    if errors:
        raise RequestValidationError(
            [{"type": "value_error", "loc": loc, "msg": msg, "input": None} for loc, msg in errors]
        )


@router.post("", status_code=202, response_model=GenerationJob)
def create_generation(body: GenerationRequest, session: SessionDep, settings: SettingsDep) -> GenerationJob:
    """Queues a generation job and answers at once with its id."""
    _check_caps(body, settings)
    model, base_model = resolve_model(session, settings, body.model)
    params = body.model_dump(exclude={"model", "prompt", "prompts"}) | {"prompts": body.prompt_list()}
    job = job_states.create_job(
        session,
        kind="generate",
        model=model,
        base_model=base_model,
        params=params,
        max_attempts=settings.max_attempts,
    )
    session.commit()
    enqueue("generate", job.id)
    return views.generation_job(job)


def _load(job_id: str) -> Job | None:
    with get_sessionmaker()() as session:
        job = session.get(Job, job_id)
        return job if job is not None and job.kind == "generate" else None


@router.get("/{job_id}", response_model=GenerationJob)
async def get_generation(
    job_id: str,
    request: Request,
    settings: SettingsDep,
    wait: Annotated[float, Query(ge=0, description="Seconds to wait for a terminal status (capped).")] = 0,
) -> GenerationJob:
    """The job's status and, once it succeeded, its outputs; ?wait=S returns as soon as it is done."""
    job = await run_in_threadpool(_load, job_id)
    if job is None:
        raise JobNotFound(f"generation job {job_id!r} not found")
    if wait > 0 and not job_states.is_terminal(job.status):

        async def finished() -> bool:
            nonlocal job
            job = await run_in_threadpool(_load, job_id)
            return job is not None and job_states.is_terminal(job.status)

        await request.app.state.finished_jobs.wait(job_id, min(wait, settings.max_wait_seconds), finished)
        assert job is not None
    return views.generation_job(job)


@router.post("/{job_id}/cancel", response_model=GenerationJob)
def cancel_generation(job_id: str, session: SessionDep) -> GenerationJob:
    """Cancels a queued job; a running batch finishes, since one generate call cannot be split."""
    job = session.get(Job, job_id)
    if job is None or job.kind != "generate":
        raise JobNotFound(f"generation job {job_id!r} not found")
    cancelled = job_states.cancel(session, job_id)
    assert cancelled is not None
    return views.generation_job(cancelled)
