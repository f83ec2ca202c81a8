"""OpenAI-compatible /v1/completions: a generation job that answers when done, or streams as it runs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from gateway import owned
from gateway.auth import TenantDep
from gateway.catalog import resolve_model
from gateway.deps import SettingsDep
from gateway.errors import ApiError, error_body
from gateway.submission import check_caps, submit
from shared import job_states, statuses
from shared.db import get_sessionmaker
from shared.models import Job, new_id
from shared.notify import stream_channel
from shared.prompts import TEMPLATE, apply_template
from shared.schemas import Completion, CompletionChoice, CompletionRequest, Usage
from shared.settings import Settings

router = APIRouter(prefix="/v1", tags=["completions"])

# A failed job's error code -> HTTP status of the completion answer.
FAILURE_STATUS = {"context_length_exceeded": 400, "model_not_found": 404}


class CompletionTimeout(ApiError):
    status_code = 504
    code = "timeout"
    type = "server_error"


def _template_for(session: Session, tenant: str, model: str) -> dict[str, str]:
    row = owned.fine_tuned_model(session, tenant, model)
    return (row.manifest.get("prompt_template") if row else None) or TEMPLATE


def _prepare(body: CompletionRequest, settings: Settings, tenant: str) -> tuple[str, str, dict[str, Any]]:
    """(model, base model, job params) of a valid request; 422 or 404 otherwise (runs in a thread)."""
    prompts = body.prompt_list()
    check_caps(prompts, "prompt", isinstance(body.prompt, str), body.max_tokens, body.n, settings)
    with get_sessionmaker()() as session:
        model, base_model = resolve_model(session, settings, tenant, body.model)
        if body.template == "model":
            template = _template_for(session, tenant, model)
            prompts = [apply_template(template, p) for p in prompts]
    params: dict[str, Any] = {
        "prompts": prompts,
        "max_tokens": body.max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "n": body.n,
        "stop": body.stop,
        "seed": body.seed,
        "stream": body.stream,
        "user": body.user,
    }
    return model, base_model, params


def _submit(settings: Settings, tenant: str, prepared: tuple[str, str, dict[str, Any]], job_id: str) -> Job:
    model, base_model, params = prepared
    with get_sessionmaker()() as session:
        return submit(
            session, settings, model=model, base_model=base_model, params=params, tenant=tenant, job_id=job_id
        )


def _load(job_id: str) -> Job:
    with get_sessionmaker()() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def _cancel_if_queued(job_id: str) -> None:
    with get_sessionmaker()() as session:
        job = session.get(Job, job_id)
        if job is not None and job.status == statuses.JobStatus.QUEUED:
            job_states.cancel(session, job_id)


def _failure(job: Job) -> JSONResponse:
    error = job.error or {"code": job.status, "message": f"job {job.status}"}
    status = FAILURE_STATUS.get(error["code"], 500)
    message = f"{error['message']} (job {job.id})"
    return JSONResponse(error_body(status, error["code"], message, "server_error"), status_code=status)


def _choices(job: Job, prompts: list[str], n: int, echo: bool) -> list[CompletionChoice]:
    outputs = (job.result or {}).get("outputs", [])
    return [
        CompletionChoice(
            text=(prompts[o["index"] // n] if echo else "") + o["text"],
            index=o["index"],
            finish_reason=o["finish_reason"],
        )
        for o in outputs
    ]


def _usage(job: Job) -> Usage:
    return Usage(**(job.result or {})["usage"])


@router.post("/completions", response_model=Completion)
async def create_completion(body: CompletionRequest, request: Request, settings: SettingsDep, tenant: TenantDep) -> Any:
    """Runs a completion as a generation job; answers when it is done, or streams it (stream: true)."""
    job_id = new_id("gen")
    prepared = await run_in_threadpool(_prepare, body, settings, tenant)
    if body.stream:
        events = _stream(body, prepared, request, settings, tenant, job_id)
        return StreamingResponse(events, media_type="text/event-stream")
    job = await run_in_threadpool(_submit, settings, tenant, prepared, job_id)
    if not await _wait(request, job.id, settings.completion_timeout_seconds):
        await run_in_threadpool(_cancel_if_queued, job.id)
        if await request.is_disconnected():
            return JSONResponse({}, status_code=499)
        raise CompletionTimeout(f"job {job.id} not finished after {settings.completion_timeout_seconds} s")
    job = await run_in_threadpool(_load, job.id)
    if job.status != statuses.JobStatus.SUCCEEDED:
        return _failure(job)
    return Completion(
        id=job.id,
        created=int(job.created_at.timestamp()),
        model=job.model,
        choices=_choices(job, body.prompt_list(), body.n, body.echo),
        usage=_usage(job),
    )


async def _wait(request: Request, job_id: str, timeout: float) -> bool:
    """True once the job is terminal; False on timeout or when the client went away."""
    finished = False

    async def check() -> bool:
        nonlocal finished
        job = await run_in_threadpool(_load, job_id)
        finished = statuses.is_terminal(job.status)
        return finished or await request.is_disconnected()

    await request.app.state.finished_jobs.wait(job_id, timeout, check)
    return finished


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _stream(
    body: CompletionRequest,
    prepared: tuple[str, str, dict[str, Any]],
    request: Request,
    settings: Settings,
    tenant: str,
    job_id: str,
) -> AsyncIterator[str]:
    """SSE chunks: text deltas while the job runs (with Redis), the rest and finish reasons at the end,
    a usage chunk, then [DONE]."""
    redis = request.app.state.redis
    pubsub = redis.pubsub() if redis is not None else None
    sent: dict[int, int] = {}  # output index -> characters streamed so far
    created = int(time.time())
    prompts = body.prompt_list()

    def chunk(index: int, text: str, finish_reason: str | None) -> str:
        choice = {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}
        return _sse({"id": job_id, "object": "text_completion", "created": created, "model": body.model,
                     "choices": [choice]})  # fmt: skip

    try:
        if pubsub is not None:
            await pubsub.subscribe(stream_channel(job_id))  # before the job exists: no delta is missed
        await run_in_threadpool(_submit, settings, tenant, prepared, job_id)
        if body.echo:
            for i in range(len(prompts) * body.n):
                sent[i] = 0
                yield chunk(i, prompts[i // body.n], None)
        deadline = time.monotonic() + settings.completion_timeout_seconds
        while True:
            if pubsub is not None:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None:
                    data = json.loads(message["data"])
                    if data.get("done"):
                        break
                    for index, text in data.items():
                        i = int(index)
                        sent[i] = sent.get(i, 0) + len(text)
                        yield chunk(i, text, None)
                    continue
            else:
                await request.app.state.finished_jobs.wait(job_id, 1.0, _terminal_check(job_id))
            job = await run_in_threadpool(_load, job_id)
            if statuses.is_terminal(job.status):
                break
            if time.monotonic() > deadline:
                yield _sse({"error": {"message": f"job {job_id} not finished in time", "type": "server_error",
                                      "code": "timeout"}})  # fmt: skip
                return
        job = await run_in_threadpool(_load, job_id)
        if job.status != statuses.JobStatus.SUCCEEDED:
            error = job.error or {"code": job.status, "message": f"job {job.status}"}
            yield _sse({"error": {"message": error["message"], "type": "server_error", "code": error["code"]}})
            return
        for output in (job.result or {})["outputs"]:
            i = output["index"]
            yield chunk(i, output["text"][sent.get(i, 0) :], output["finish_reason"])
        usage = _usage(job).model_dump()
        yield _sse({"id": job_id, "object": "text_completion", "created": created, "model": body.model,
                    "choices": [], "usage": usage})  # fmt: skip
        yield _sse("[DONE]")
    finally:
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(pubsub.aclose())


def _terminal_check(job_id: str) -> Any:
    async def check() -> bool:
        job = await run_in_threadpool(_load, job_id)
        return statuses.is_terminal(job.status)

    return check
