"""Generation jobs: submit prompts, read (or wait for) their outputs, cancel."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from gateway import owned, pg, views
from gateway.auth import TenantDep
from gateway.catalog import resolve_model_async
from gateway.chat_jobs import instruction_params
from gateway.deps import SessionDep, SettingsDep
from gateway.errors import BODY_ERRORS, V1_ERRORS, documented
from gateway.front_door import FrontDoor, front_door
from gateway.responses import json_response
from gateway.submission import check_caps, submit_async
from gateway.waiting import until_terminal
from shared import job_states
from shared.db import get_read_sessionmaker
from shared.job_data import ChatTurn, GenerationParams
from shared.models import Job
from shared.schemas import GenerationJob, GenerationRequest
from shared.settings import Settings

router = APIRouter(prefix="/v1/generations", tags=["generations"], responses=V1_ERRORS)
log = logging.getLogger(__name__)


@router.post("", status_code=202, response_model=GenerationJob, responses=BODY_ERRORS | documented(404))
async def create_generation(
    body: GenerationRequest, request: Request, settings: SettingsDep, tenant: TenantDep
) -> Response:
    """Queues a generation job and answers at once with its id."""
    return await queue_generation(body, front_door(request.scope), settings, tenant)


async def queue_generation(body: GenerationRequest, door: FrontDoor, settings: Settings, tenant: str) -> Response:
    """The 202 of a queued generation job (also gateway.hot_routes'); a RequestValidationError (a cap, an empty
    prompt) is raised before anything is written."""
    prompts = body.prompt_list()
    field = "prompt" if body.prompt is not None else "prompts"
    check_caps(prompts, field, body.prompt is not None, body.max_tokens, body.n, body.stop, settings)
    model, base_model = await resolve_model_async(door, settings, tenant, body.model)
    conversations, template = (
        await run_in_threadpool(_instruction_params, tenant, model, prompts)
        if body.template == "model"
        else (None, None)
    )
    params = GenerationParams(
        conversations=conversations,
        chat_template=template,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop,
        seed=body.seed,
        n=body.n,
        prompts=prompts,
    )
    job = await submit_async(
        door, settings, kind="generate", model=model, base_model=base_model, params=params, tenant=tenant
    )
    return json_response(views.generation_job(job), status_code=202)


def _instruction_params(tenant: str, model: str, prompts: list[str]) -> tuple[list[list[ChatTurn]], str | None]:
    with get_read_sessionmaker()() as session:
        return instruction_params(session, tenant, model, prompts)


def _load(tenant: str, job_id: str) -> Job:
    # Autocommit: a poll is one SELECT, not BEGIN + SELECT + ROLLBACK (polls are most of the gateway's traffic).
    with get_read_sessionmaker()() as session:
        return owned.job_or_404(session, tenant, job_id, kind="generate")


async def load_now(door: FrontDoor, tenant: str, job_id: str) -> views.JobView:
    """_load from the event loop: through the asyncpg pool on Postgres, else in a worker thread."""
    if door.pg is None:
        return await run_in_threadpool(_load, tenant, job_id)
    return owned.checked(await pg.job_row(door.pg, job_id), tenant, job_id, kind="generate")


@router.get("/{job_id}", response_model=GenerationJob, responses=documented(404))
async def get_generation(
    job_id: str,
    request: Request,
    settings: SettingsDep,
    tenant: TenantDep,
    wait: Annotated[float, Query(ge=0, description="Seconds to wait for a terminal status (capped).")] = 0,
) -> Response:
    """The job's status and, once it succeeded, its outputs; ?wait=S returns as soon as it is done."""
    if wait <= 0:
        return json_response(views.generation_job(await load_now(front_door(request.scope), tenant, job_id)))
    timeout = min(wait, settings.max_wait_seconds)
    job = await until_terminal(request, job_id, timeout, read=lambda: _load(tenant, job_id))
    assert job is not None  # _load raises JobNotFound instead
    return json_response(views.generation_job(job))


@router.post("/{job_id}/cancel", response_model=GenerationJob, responses=documented(404))
def cancel_generation(job_id: str, session: SessionDep, tenant: TenantDep) -> GenerationJob:
    """Cancels a queued job; a running batch finishes, since one generate call cannot be split."""
    owned.job_or_404(session, tenant, job_id, kind="generate")
    cancelled = job_states.cancel(session, job_id)
    assert cancelled is not None
    return views.generation_job(cancelled)
