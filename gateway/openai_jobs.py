"""The generation job behind an OpenAI-style route (/v1/completions, and any other that runs one): submitting it,
waiting for its end, and a failed job as the route's answer.

The route answers only once the job is done, or streams it (gateway/stream_relay.py); a job still queued when
the route stops waiting (its time ran out, or the client left) is cancelled, so it neither runs later for
nobody nor keeps counting against the tenant's quota. A running one finishes (a batch cannot be split) and its
result stays readable at GET /v1/generations/{id}.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from gateway.errors import ApiError, error_body
from gateway.submission import check_quota, submit
from gateway.waiting import until_terminal
from shared import job_states
from shared.db import get_sessionmaker
from shared.job_data import ErrorCode, GenerationParams, JobError
from shared.models import Job
from shared.settings import Settings
from shared.statuses import JobStatus, is_terminal

# A failed job's error code -> HTTP status of the route's answer (any other code: 500).
FAILURE_STATUS: dict[str, int] = {ErrorCode.CONTEXT_LENGTH_EXCEEDED: 400, ErrorCode.MODEL_NOT_FOUND: 404,
                                 ErrorCode.MODEL_DELETED: 404}
CLIENT_GONE = 499  # nginx's status for a request whose client closed the connection first


class CompletionTimeout(ApiError):
    status_code = 504
    code = "timeout"
    type = "server_error"


def submit_generation(
    settings: Settings, tenant: str, job_id: str, model: tuple[str, str], params: GenerationParams
) -> Job:
    """Writes, commits and publishes the generation job (429 over the tenant's quota); runs in a thread.

    model is (the model asked for, the base model it runs on), as gateway.catalog.resolve_model gives it.
    """
    with get_sessionmaker()() as session:
        return submit(
            session,
            settings,
            kind="generate",
            model=model[0],
            base_model=model[1],
            params=params,
            tenant=tenant,
            job_id=job_id,
        )


def check_quota_now(settings: Settings, tenant: str) -> None:
    """429 when the tenant is at its quota already (before a stream's 200 commits the answer); in a thread."""
    with get_sessionmaker()() as session:
        check_quota(session, settings, tenant)


def cancel_if_queued(job_id: str) -> None:
    """Cancels the job if no worker has claimed it yet; runs in a thread."""
    with get_sessionmaker()() as session:
        job = session.get(Job, job_id)
        if job is not None and job.status == JobStatus.QUEUED:
            job_states.cancel(session, job_id)


def failure(job: Job) -> tuple[str, str]:
    """(code, message) of a job that ended without succeeding: its worker's error, or how it ended."""
    if job.error is not None:
        error = JobError.model_validate(job.error)
        return error.code, error.message
    return job.status, f"job {job.status}"


def failure_answer(job: Job) -> JSONResponse:
    """A job that did not succeed as the route's answer: an OpenAI error with the status its code maps to."""
    code, message = failure(job)
    status = FAILURE_STATUS.get(code, 500)
    return JSONResponse(error_body(code, f"{message} (job {job.id})", "server_error"), status_code=status)


def timeout_message(job_id: str, settings: Settings) -> str:
    return f"job {job_id} not finished after {settings.completion_timeout_seconds} s"


async def succeeded_job(request: Request, settings: Settings, job_id: str) -> Job | JSONResponse:
    """The job once it succeeded, or the answer to give instead: its failure, or 499 when the client left.

    CompletionTimeout (504) when it is not done within completion_timeout_seconds; a job still queued then (or
    when the client left) is cancelled.
    """
    timeout = settings.completion_timeout_seconds
    job = await until_terminal(request, job_id, timeout, until_disconnected=True)
    assert job is not None  # the caller submitted it
    if not is_terminal(job.status):
        await run_in_threadpool(cancel_if_queued, job_id)
        if await request.is_disconnected():
            return JSONResponse({}, status_code=CLIENT_GONE)
        raise CompletionTimeout(timeout_message(job_id, settings))
    if job.status != JobStatus.SUCCEEDED:
        return failure_answer(job)
    return job
