"""Relaying a generation job to a streaming client: its text deltas as the worker publishes them, then what the
final row adds, as events that an OpenAI-style route frames in its own chunk shape (gateway/sse.py).

    Submitted   the job is queued: the route may send what comes before any text (echoed prompts)
    TextDelta   new text of one output; the last one of each output carries its finish reason
    Finished    the job succeeded and every output's text was relayed: its token usage
    StreamError the stream ends with this error (the job could not be queued, failed, timed out, or was
                re-run after a worker died and wrote other text than was streamed)

Deltas travel on Redis (shared.notify); without Redis (the embedded default) the whole text comes at the end.
A stream whose client goes away, or whose time runs out, cancels its job if it is still queued
(gateway/openai_jobs.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Literal

from fastapi import Request
from redis.asyncio.client import PubSub
from starlette.concurrency import run_in_threadpool

from gateway.closing import close_within
from gateway.errors import ApiError
from gateway.openai_jobs import cancel_if_queued, failure, timeout_message
from gateway.waiting import read_job, until_terminal
from shared.job_data import GenerationResult, TokenLogprob, Usage
from shared.models import Job
from shared.notify import stream_channel
from shared.settings import Settings
from shared.statuses import JobStatus, is_terminal


@dataclass(frozen=True)
class Submitted:
    """The job is queued."""


@dataclass(frozen=True)
class TextDelta:
    index: int  # the output: choice j of prompt i is output i*n+j
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: list[TokenLogprob] | None = None  # the output's every entry, on its last delta (when asked for)


@dataclass(frozen=True)
class Finished:
    usage: Usage


@dataclass(frozen=True)
class StreamError:
    code: str
    message: str
    type: str = "server_error"


RelayEvent = Submitted | TextDelta | Finished | StreamError


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


async def relay_job(
    request: Request, settings: Settings, job_id: str, submit: Callable[[], Job]
) -> AsyncGenerator[RelayEvent]:
    """Submits the job (submit runs in a thread and must create it as job_id) and relays it to its end.

    Iterate it inside contextlib.aclosing: closing it early (the client went away) cancels the job if it is
    still queued and closes its subscription.
    """
    redis = request.app.state.redis
    pubsub: PubSub | None = redis.pubsub() if redis is not None else None
    submitted = finished = False
    try:
        if pubsub is not None:
            await pubsub.subscribe(stream_channel(job_id))  # before the job exists: no delta is missed
        try:
            await run_in_threadpool(submit)
        except ApiError as exc:
            yield StreamError(exc.code, exc.message, exc.type)
            return
        submitted = True
        yield Submitted()
        relay = Relay()
        async with contextlib.aclosing(_while_running(request, settings, job_id, pubsub, relay)) as running:
            async for event in running:
                finished = isinstance(event, StreamError)  # a timeout: the job was cancelled if queued
                yield event
        if finished:
            return
        finished = True
        job = await run_in_threadpool(read_job, job_id)
        assert job is not None  # submitted above; jobs are never deleted
        for final in _final_events(job, relay):
            yield final
    finally:

        async def clean_up() -> None:
            if submitted and not finished:  # the client went away mid-stream: as on a timeout
                with contextlib.suppress(Exception):
                    await run_in_threadpool(cancel_if_queued, job_id)
            if pubsub is not None:
                close = pubsub.aclose()  # type: ignore[no-untyped-call]
                await close_within(close, f"the stream subscription of {job_id}")

        await asyncio.shield(clean_up())  # runs to its end even when the stream's task is cancelled


async def _while_running(
    request: Request, settings: Settings, job_id: str, pubsub: PubSub | None, relay: Relay
) -> AsyncGenerator[TextDelta | StreamError]:
    """The job's text deltas until it is terminal; a StreamError (the job cancelled if queued) on timeout."""
    deadline = time.monotonic() + settings.completion_timeout_seconds
    while True:
        if pubsub is not None:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None:
                data = json.loads(message["data"])
                if data.get("done"):
                    return
                for index, text in relay.take(data["attempt"], data["deltas"]):
                    yield TextDelta(index, text)
                continue
            job = await run_in_threadpool(read_job, job_id)
        else:
            job = await until_terminal(request, job_id, 1.0)
        if job is not None and is_terminal(job.status):
            return
        if time.monotonic() > deadline:
            await run_in_threadpool(cancel_if_queued, job_id)
            yield StreamError("timeout", timeout_message(job_id, settings))
            return


def _final_events(job: Job, relay: Relay) -> list[RelayEvent]:
    """What the terminal row adds: the rest of each output's text and its finish reason, then the usage."""
    if job.status != JobStatus.SUCCEEDED:
        return [StreamError(*failure(job))]
    result = GenerationResult.model_validate(job.result)
    events: list[RelayEvent] = []
    for output in result.outputs:
        rest = relay.rest(output.index, output.text)
        if rest is None:
            message = f"job {job.id} was re-run after a worker failure and wrote different text than was streamed"
            return [*events, StreamError("stream_diverged", message)]
        events.append(TextDelta(output.index, rest, output.finish_reason, output.logprobs))
    return [*events, Finished(result.usage)]
