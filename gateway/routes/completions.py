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
from gateway.closing import close_within
from gateway.deps import SettingsDep
from gateway.errors import V1_ERRORS, ApiError, documented, error_body
from gateway.submission import check_caps, check_quota, submit
from shared import job_states, statuses
from shared.db import get_sessionmaker
from shared.models import Job, new_id
from shared.notify import stream_channel
from shared.prompts import TEMPLATE, apply_template
from shared.schemas import Completion, CompletionChoice, CompletionRequest, Usage
from shared.settings import Settings

router = APIRouter(prefix="/v1", tags=["completions"], responses=V1_ERRORS)

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
    check_caps(prompts, "prompt", isinstance(body.prompt, str), body.max_tokens, body.n, body.stop, settings)
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


def _check_quota(settings: Settings, tenant: str) -> None:
    with get_sessionmaker()() as session:
        check_quota(session, settings, tenant)


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


@router.post(
    "/completions",
    response_model=Completion,
    responses={
        200: {
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "description": "The completion; with stream: true, server-sent events ending in `data: [DONE]`.",
        },
        **documented(400, 404, 500, 504),
    },
)
async def create_completion(body: CompletionRequest, request: Request, settings: SettingsDep, tenant: TenantDep) -> Any:
    """Runs a completion as a generation job; answers when it is done, or streams it (stream: true)."""
    job_id = new_id("gen")
    prepared = await run_in_threadpool(_prepare, body, settings, tenant)
    if body.stream:
        # A 429 must come before the stream's 200; a quota filled meanwhile ends the stream with an error event.
        await run_in_threadpool(_check_quota, settings, tenant)
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


class Relay:
    """What a stream has sent of each output, across the attempts of a job.

    A job re-run after its worker died streams again from the start; only text beyond what the client
    already has is passed on, and only while the new attempt agrees with it (greedy or seeded
    decoding repeats itself).
    """

    def __init__(self) -> None:
        self.sent: dict[int, str] = {}  # output index -> text the client has
        self.attempt = 0
        self.written: dict[int, str] = {}  # output index -> text of the current attempt so far

    def take(self, attempt: int, deltas: dict[str, str]) -> list[tuple[int, str]]:
        """The (output index, new text) to send for one message of the worker."""
        if attempt < self.attempt:
            return []
        if attempt > self.attempt:
            self.attempt, self.written = attempt, {}
        out = []
        for index, text in deltas.items():
            i = int(index)
            written = self.written[i] = self.written.get(i, "") + text
            sent = self.sent.get(i, "")
            if len(written) > len(sent) and written.startswith(sent):
                out.append((i, written[len(sent) :]))
                self.sent[i] = written
        return out

    def rest(self, index: int, final: str) -> str | None:
        """What the final text adds to what was sent; None when it does not continue it."""
        sent = self.sent.get(index, "")
        return final[len(sent) :] if final.startswith(sent) else None


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
    relay = Relay()
    created = int(time.time())
    prompts = body.prompt_list()

    def chunk(index: int, text: str, finish_reason: str | None) -> str:
        choice = {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}
        return _sse({"id": job_id, "object": "text_completion", "created": created, "model": body.model,
                     "choices": [choice]})  # fmt: skip

    submitted = finished = False
    try:
        if pubsub is not None:
            await pubsub.subscribe(stream_channel(job_id))  # before the job exists: no delta is missed
        try:
            await run_in_threadpool(_submit, settings, tenant, prepared, job_id)
        except ApiError as exc:
            yield _sse({"error": {"message": exc.message, "type": exc.type, "code": exc.code}})
            return
        submitted = True
        if body.echo:
            for i in range(len(prompts) * body.n):
                yield chunk(i, prompts[i // body.n], None)
        deadline = time.monotonic() + settings.completion_timeout_seconds
        while True:
            if pubsub is not None:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None:
                    data = json.loads(message["data"])
                    if data.get("done"):
                        break
                    for i, text in relay.take(data["attempt"], data["deltas"]):
                        yield chunk(i, text, None)
                    continue
            else:
                await request.app.state.finished_jobs.wait(job_id, 1.0, _terminal_check(job_id))
            job = await run_in_threadpool(_load, job_id)
            if statuses.is_terminal(job.status):
                break
            if time.monotonic() > deadline:
                # As without stream: a job still queued is cancelled, so it neither runs later for nobody
                # nor keeps counting against the tenant's quota; a running one finishes (a batch cannot
                # be split) and its result stays readable at GET /v1/generations/{id}.
                await run_in_threadpool(_cancel_if_queued, job_id)
                finished = True
                message = f"job {job_id} not finished after {settings.completion_timeout_seconds} s"
                yield _sse({"error": {"message": message, "type": "server_error", "code": "timeout"}})
                return
        finished = True
        job = await run_in_threadpool(_load, job_id)
        if job.status != statuses.JobStatus.SUCCEEDED:
            error = job.error or {"code": job.status, "message": f"job {job.status}"}
            yield _sse({"error": {"message": error["message"], "type": "server_error", "code": error["code"]}})
            return
        for output in (job.result or {})["outputs"]:
            rest = relay.rest(output["index"], output["text"])
            if rest is None:
                message = f"job {job_id} was re-run after a worker failure and wrote different text than was streamed"
                yield _sse({"error": {"message": message, "type": "server_error", "code": "stream_diverged"}})
                return
            yield chunk(output["index"], rest, output["finish_reason"])
        if body.stream_options is None or body.stream_options.include_usage:  # off only when asked
            usage = _usage(job).model_dump()
            yield _sse({"id": job_id, "object": "text_completion", "created": created, "model": body.model,
                        "choices": [], "usage": usage})  # fmt: skip
        yield _sse("[DONE]")
    finally:

        async def clean_up() -> None:
            if submitted and not finished:  # the client went away mid-stream: as on a timeout
                with contextlib.suppress(Exception):
                    await run_in_threadpool(_cancel_if_queued, job_id)
            if pubsub is not None:
                await close_within(pubsub.aclose(), f"the stream subscription of {job_id}")

        await asyncio.shield(clean_up())  # runs to its end even when the stream's task is cancelled


def _terminal_check(job_id: str) -> Any:
    async def check() -> bool:
        job = await run_in_threadpool(_load, job_id)
        return statuses.is_terminal(job.status)

    return check
