"""OpenAI-compatible /v1/chat/completions: a generation job on a conversation, answered when done or streamed."""

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
from gateway.chat_jobs import chat_job_params
from gateway.deps import SettingsDep
from gateway.errors import V1_ERRORS, documented
from gateway.openai_jobs import check_quota_now, submit_generation, succeeded_job
from gateway.stream_relay import Finished, RelayEvent, StreamError, Submitted, TextDelta, relay_job
from shared.chat_schemas import (
    ChatChoiceLogprobs,
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatTokenLogprob,
)
from shared.db import get_sessionmaker
from shared.job_data import GenerationParams, GenerationResult, TokenLogprob
from shared.models import new_id
from shared.settings import Settings

router = APIRouter(prefix="/v1", tags=["chat"], responses=V1_ERRORS)


def _prepare(body: ChatCompletionRequest, settings: Settings, tenant: str) -> tuple[tuple[str, str], GenerationParams]:
    with get_sessionmaker()() as session:
        return chat_job_params(session, settings, tenant, body)


def chat_logprobs(entries: list[TokenLogprob] | None) -> ChatChoiceLogprobs | None:
    """A choice's logprobs in the chat shape (None when the request asked for none)."""
    if entries is None:
        return None
    return ChatChoiceLogprobs(content=[ChatTokenLogprob.model_validate(e.model_dump()) for e in entries])


def chat_completion(job_id: str, created: int, model: str, result: GenerationResult) -> ChatCompletion:
    """The chat.completion object of a succeeded chat job."""
    choices = [
        ChatCompletionChoice(
            index=o.index,
            message=ChatCompletionMessage(content=o.text),
            finish_reason=o.finish_reason,
            logprobs=chat_logprobs(o.logprobs),
        )
        for o in result.outputs
    ]
    return ChatCompletion(id=job_id, created=created, model=model, choices=choices, usage=result.usage)


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={
        200: {
            "content": {sse.MEDIA_TYPE: {"schema": {"type": "string"}}},
            "description": "The chat completion; with stream: true, chat.completion.chunk events ending in "
            "`data: [DONE]`.",
        },
        **documented(400, 404, 500, 504),
    },
)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, settings: SettingsDep, tenant: TenantDep
) -> ChatCompletion | Response:
    """Runs a chat completion as a generation job; answers when it is done, or streams it (stream: true)."""
    job_id = new_id("gen")
    model, params = await run_in_threadpool(_prepare, body, settings, tenant)
    submit = partial(submit_generation, settings, tenant, job_id, model, params)
    if body.stream:
        await run_in_threadpool(check_quota_now, settings, tenant)  # a 429 must come before the stream's 200
        events = _stream(body, job_id, relay_job(request, settings, job_id, submit))
        return StreamingResponse(events, media_type=sse.MEDIA_TYPE)
    job = await run_in_threadpool(submit)
    done = await succeeded_job(request, settings, job.id)
    if isinstance(done, JSONResponse):
        return done
    result = GenerationResult.model_validate(done.result)
    return chat_completion(done.id, int(done.created_at.timestamp()), done.model, result)


async def _stream(body: ChatCompletionRequest, job_id: str, relayed: AsyncGenerator[RelayEvent]) -> AsyncIterator[str]:
    """chat.completion.chunk events: each choice's role first, its content deltas, its finish reason (and its
    logprobs, when asked for, on its last chunk); a usage chunk when stream_options.include_usage; [DONE]."""
    created = int(time.time())
    usage_asked = body.stream_options is not None and body.stream_options.include_usage

    def chunk(choices: list[dict[str, object]], **extra: object) -> str:
        head = {"id": job_id, "object": "chat.completion.chunk", "created": created, "model": body.model}
        return sse.event(head | {"choices": choices} | ({"usage": None} if usage_asked else {}) | extra)

    def choice(index: int, delta: dict[str, str], finish: str | None = None, logprobs: object = None) -> str:
        return chunk([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])

    async with contextlib.aclosing(relayed) as events:
        async for event in events:
            if isinstance(event, Submitted):
                for i in range(body.n):
                    yield choice(i, {"role": "assistant", "content": ""})
            elif isinstance(event, TextDelta):
                logprobs = chat_logprobs(event.logprobs)
                delta = {"content": event.text} if event.text or event.finish_reason is None else {}
                yield choice(event.index, delta, event.finish_reason, logprobs.model_dump() if logprobs else None)
            elif isinstance(event, Finished):
                if usage_asked:
                    yield chunk([], usage=event.usage.model_dump())
                yield sse.DONE
            elif isinstance(event, StreamError):
                yield sse.error_event(event.code, event.message, event.type)
