"""OpenAI-compatible /v1/completions: a generation job that answers when done, or streams as it runs."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from functools import partial

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from gateway import sse
from gateway.auth import TenantDep
from gateway.catalog import resolve_model
from gateway.chat_jobs import instruction_params
from gateway.deps import SettingsDep
from gateway.errors import V1_ERRORS, documented
from gateway.openai_jobs import check_quota_now, submit_generation, succeeded_job
from gateway.stream_relay import Finished, RelayEvent, StreamError, Submitted, TextDelta, relay_job
from gateway.submission import check_caps
from shared.db import get_sessionmaker
from shared.job_data import GenerationParams, GenerationResult, TokenLogprob
from shared.models import new_id
from shared.schemas import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest
from shared.settings import Settings

router = APIRouter(prefix="/v1", tags=["completions"], responses=V1_ERRORS)


def _prepare(body: CompletionRequest, settings: Settings, tenant: str) -> tuple[tuple[str, str], GenerationParams]:
    """((model, base model), job params) of a valid request; 400 or 404 otherwise (runs in a thread).

    With template "model" each prompt is a user turn the worker renders with the model's chat template."""
    prompts = body.prompt_list()
    check_caps(prompts, "prompt", isinstance(body.prompt, str), body.max_tokens, body.n, body.stop, settings)
    conversations, template = None, None
    with get_sessionmaker()() as session:
        model = resolve_model(session, settings, tenant, body.model)
        if body.template == "model":
            conversations, template = instruction_params(session, tenant, model[0], prompts)
    params = GenerationParams(
        conversations=conversations,
        chat_template=template,
        logprobs=body.logprobs,
        prompts=prompts,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        n=body.n,
        stop=body.stop,
        seed=body.seed,
        stream=body.stream,
        user=body.user,
    )
    return model, params


def legacy_logprobs(entries: list[TokenLogprob] | None, offset: int = 0) -> CompletionLogprobs | None:
    """OpenAI's legacy logprobs object of an output's entries; offset: where its text starts in the choice."""
    if entries is None:
        return None
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return CompletionLogprobs(
        tokens=[e.token for e in entries],
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[{t.token: t.logprob for t in e.top_logprobs} for e in entries],
        text_offset=offsets,
    )


def _choices(result: GenerationResult, prompts: list[str], n: int, echo: bool) -> list[CompletionChoice]:
    choices = []
    for o in result.outputs:
        head = prompts[o.index // n] if echo else ""
        logprobs = legacy_logprobs(o.logprobs, len(head))
        choices.append(
            CompletionChoice(text=head + o.text, index=o.index, finish_reason=o.finish_reason, logprobs=logprobs)
        )
    return choices


@router.post(
    "/completions",
    response_model=Completion,
    responses={
        200: {
            "content": {sse.MEDIA_TYPE: {"schema": {"type": "string"}}},
            "description": "The completion; with stream: true, server-sent events ending in `data: [DONE]`.",
        },
        **documented(400, 404, 500, 504),
    },
)
async def create_completion(
    body: CompletionRequest, request: Request, settings: SettingsDep, tenant: TenantDep
) -> Completion | Response:
    """Runs a completion as a generation job; answers when it is done, or streams it (stream: true)."""
    job_id = new_id("gen")
    model, params = await run_in_threadpool(_prepare, body, settings, tenant)
    submit = partial(submit_generation, settings, tenant, job_id, model, params)
    if body.stream:
        # A 429 must come before the stream's 200; a quota filled meanwhile ends the stream with an error event.
        await run_in_threadpool(check_quota_now, settings, tenant)
        events = _stream(body, job_id, relay_job(request, settings, job_id, submit))
        return StreamingResponse(events, media_type=sse.MEDIA_TYPE)
    job = await run_in_threadpool(submit)
    done = await succeeded_job(request, settings, job.id)
    if isinstance(done, JSONResponse):
        return done
    result = GenerationResult.model_validate(done.result)
    return Completion(
        id=done.id,
        created=int(done.created_at.timestamp()),
        model=done.model,
        choices=_choices(result, body.prompt_list(), body.n, body.echo),
        usage=result.usage,
    )


async def _stream(body: CompletionRequest, job_id: str, relayed: AsyncGenerator[RelayEvent]) -> AsyncIterator[str]:
    """SSE chunks: the echoed prompts, text deltas while the job runs (with Redis), the rest and finish reasons
    at the end, a usage chunk, then [DONE]; or an error event."""
    created = int(time.time())
    prompts = body.prompt_list()

    def chunk(choices: list[dict[str, object]], **extra: object) -> str:
        return sse.event(
            {"id": job_id, "object": "text_completion", "created": created, "model": body.model, "choices": choices}
            | extra
        )

    def text(
        index: int, value: str, finish_reason: str | None = None, logprobs: CompletionLogprobs | None = None
    ) -> str:
        logprobs_json = logprobs.model_dump() if logprobs is not None else None
        return chunk([{"text": value, "index": index, "logprobs": logprobs_json, "finish_reason": finish_reason}])

    async with contextlib.aclosing(relayed) as events:
        async for event in events:
            if isinstance(event, Submitted) and body.echo:
                for i in range(len(prompts) * body.n):
                    yield text(i, prompts[i // body.n])
            elif isinstance(event, TextDelta):
                yield text(event.index, event.text, event.finish_reason, legacy_logprobs(event.logprobs))
            elif isinstance(event, Finished):
                if body.stream_options is None or body.stream_options.include_usage:  # off only when asked
                    yield chunk([], usage=event.usage.model_dump())
                yield sse.DONE
            elif isinstance(event, StreamError):
                yield sse.error_event(event.code, event.message, event.type)
