"""OpenAI batches on the job queue: create (each valid line a generation job at batch priority), cancel, and
finalize (the output and error JSONL files, built from the job rows once none is active).

Finalizing happens in the background, in every gateway's reaper pass (settle_due), and on a client's read
(GET or list) when it comes first; either way one transaction that starts with a conditional UPDATE of the
batch row writes the files and ends the batch, so several gateways and reapers racing finalize it once.
The output holds one line per custom_id, built from the jobs' rows: a retried job has one row, so it never
answers twice.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import exists, func, select, update
from sqlalchemy.orm import Session

from gateway import owned
from gateway.batch_lines import BadLine, GoodLine, check_lines
from gateway.errors import ApiError, JobStateConflict, NotFound
from gateway.routes.chat import chat_completion
from gateway.routes.completions import completion_choices
from shared import artifacts, job_states
from shared.artifacts import ArtifactStore
from shared.batch_schemas import RUNNING_STATUSES, BatchRequest, BatchStatus
from shared.celery_app import enqueue_after_commit
from shared.job_data import GenerationParams, GenerationResult
from shared.models import Batch, File, Job, new_id, utcnow
from shared.schemas import Completion
from shared.settings import Settings
from shared.statuses import JobStatus

ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.PAUSED)


class BatchNotFound(NotFound):
    code = "batch_not_found"


class InvalidBatchInput(ApiError):
    code = "invalid_input_file"
    param = "input_file_id"


def batch_or_404(session: Session, tenant: str, batch_id: str) -> Batch:
    """The tenant's batch with this id; BatchNotFound (404) otherwise (another tenant's too)."""
    row = session.get(Batch, batch_id)
    if row is None or row.tenant != tenant:
        raise BatchNotFound(f"batch {batch_id!r} not found")
    return row


def create(session: Session, settings: Settings, tenant: str, body: BatchRequest) -> Batch:
    """Checks every line of the input file, writes the batch and a job per valid line, commits, publishes."""
    source = owned.file_or_404(session, tenant, body.input_file_id)
    if source.purpose != "batch":
        raise InvalidBatchInput(f"file {source.id!r} has purpose {source.purpose!r}, not batch")
    if source.records > settings.max_batch_requests:
        raise InvalidBatchInput(f"at most {settings.max_batch_requests} requests in one batch")
    now = utcnow()
    batch = Batch(
        id=f"batch_{secrets.token_hex(12)}",
        tenant=tenant,
        endpoint=body.endpoint,
        input_file_id=source.id,
        completion_window=body.completion_window,
        status=BatchStatus.IN_PROGRESS,
        batch_metadata=body.metadata,
        total=0,
        completed=0,
        failed=0,
        created_at=now,
        in_progress_at=now,
        expires_at=now + timedelta(hours=24),
    )
    bad: list[dict[str, Any]] = []
    jobs: list[str] = []
    with _lines(settings, source.path) as lines:
        for checked in check_lines(lines, session, settings, tenant, body.endpoint):
            batch.total += 1
            if isinstance(checked, BadLine):
                bad.append(checked.as_json())
            else:
                jobs.append(_add_job(session, settings, tenant, batch.id, checked).id)
    if batch.total == 0:
        raise InvalidBatchInput(f"file {source.id!r} holds no requests")
    batch.line_errors = {"data": bad}
    session.add(batch)
    session.commit()
    for job_id in jobs:
        enqueue_after_commit("generate", job_id)
    return finalize_if_done(session, settings, batch)


def _add_job(session: Session, settings: Settings, tenant: str, batch_id: str, line: GoodLine) -> Job:
    return job_states.create_batch_request(
        session,
        batch_id=batch_id,
        custom_id=line.custom_id,
        line=line.line,
        model=line.model[0],
        base_model=line.model[1],
        params=line.params,
        max_attempts=settings.max_attempts,
        tenant=tenant,
    )


@contextmanager
def _lines(settings: Settings, key: str) -> Iterator[Iterator[bytes]]:
    """The stored input file's lines, read from a local copy (removed afterwards)."""
    settings.scratch_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="batch-", dir=settings.scratch_dir) as folder:
        local = Path(folder) / "input.jsonl"
        ArtifactStore.from_settings(settings).get_file(key, local)
        with local.open("rb") as f:
            yield iter(f)


def cancel(session: Session, settings: Settings, batch: Batch) -> Batch:
    """Cancels a batch: its queued jobs at once, running ones when their worker next looks (within about a
    second); 409 once it has ended."""
    if batch.status not in (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS):
        raise JobStateConflict(f"batch {batch.id!r} is {batch.status}; only a running batch can be cancelled")
    taken = session.execute(
        update(Batch)
        .where(Batch.id == batch.id, Batch.status == batch.status)
        .values(status=BatchStatus.CANCELLING, cancelling_at=utcnow())
    )
    job_states.cancel_batch(session, batch.id)
    session.commit()
    session.refresh(batch)
    if taken.rowcount != 1:  # type: ignore[attr-defined]
        raise JobStateConflict(f"batch {batch.id!r} is {batch.status}; only a running batch can be cancelled")
    return finalize_if_done(session, settings, batch)


def counts(session: Session, batch: Batch) -> tuple[int, int]:
    """(completed, failed) requests of a batch: while it runs, succeeded jobs and failed jobs with refused lines;
    once finalized, the lines of its output and error files (they add up to total)."""
    if batch.status not in RUNNING_STATUSES:
        return batch.completed, batch.failed
    by_status = dict(
        session.execute(select(Job.status, func.count()).where(Job.batch_id == batch.id).group_by(Job.status)).all()
    )
    refused = len(batch.line_errors.get("data", []))
    return by_status.get(JobStatus.SUCCEEDED, 0), by_status.get(JobStatus.FAILED, 0) + refused


def finalize_if_done(session: Session, settings: Settings, batch: Batch) -> Batch:
    """The batch, finalized first when none of its requests is active any more (and nobody else finalized it)."""
    if batch.status in RUNNING_STATUSES:
        finalize(session, settings, batch.id)
        session.refresh(batch)  # whoever finalized it (this call, another gateway's read, a reaper)
    return batch


def settle_due(session: Session, settings: Settings, limit: int = 100) -> list[str]:
    """The reaper's part (every gateway's reaper pass): batches past their completion window expire, and
    batches with no active request are finalized; the ids of the batches finalized."""
    expire_overdue(session, limit)
    done = session.scalars(
        select(Batch.id)
        .where(Batch.status.in_(RUNNING_STATUSES), ~_any_active(Batch.id))
        .order_by(Batch.created_at)
        .limit(limit)
    ).all()
    session.rollback()
    return [batch_id for batch_id in done if finalize(session, settings, batch_id)]


def expire_overdue(session: Session, limit: int = 100) -> list[str]:
    """Batches past expires_at (created_at + completion_window) with requests still to run expire: expired_at
    set, queued requests cancelled at once, running ones when their worker next looks (finished answers stay);
    committed. The batch ends `expired` when finalized; the ids."""
    now = utcnow()
    overdue = (Batch.status == BatchStatus.IN_PROGRESS) & Batch.expired_at.is_(None) & (Batch.expires_at < now)
    candidates = session.scalars(select(Batch.id).where(overdue, _any_active(Batch.id)).limit(limit)).all()
    session.rollback()
    expired = []
    for batch_id in candidates:
        taken = session.execute(update(Batch).where(Batch.id == batch_id, overdue).values(expired_at=now))
        if taken.rowcount == 1:  # type: ignore[attr-defined]
            job_states.cancel_batch(session, batch_id)
            expired.append(batch_id)
        session.commit()
    return expired


def _any_active(batch_id: Any) -> Any:
    return exists().where(Job.batch_id == batch_id, Job.status.in_(ACTIVE))


def finalize(session: Session, settings: Settings, batch_id: str) -> bool:
    """Ends a batch none of whose requests is active: writes its output and error files, request counts and
    final status in one transaction; True when this call did it.

    The transaction starts with a conditional UPDATE of the batch row (still running, no request active),
    which holds the row's lock until the commit: a second finalizer (another gateway's read or reaper) waits
    for it, then finds the batch ended and does nothing, so no batch gets two output files. A finalizer that
    dies rolls back whole (its stored bytes, never referenced, are left behind) and the next one starts over.
    """
    now = utcnow()
    taken = session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.status.in_(RUNNING_STATUSES), ~_any_active(batch_id))
        .values(status=BatchStatus.FINALIZING, finalizing_at=now)
        .execution_options(synchronize_session=False)
    )
    if taken.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        return False
    try:
        batch = session.get(Batch, batch_id, populate_existing=True)
        assert batch is not None
        _write_results(session, settings, batch)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return True


def _ending(batch: Batch, jobs: Sequence[Job]) -> BatchStatus:
    """cancelled when a client cancelled it; expired when its window ended before all its requests ran."""
    if batch.cancelling_at is not None:
        return BatchStatus.CANCELLED
    if batch.expired_at is not None and any(job.status == JobStatus.CANCELLED for job in jobs):
        return BatchStatus.EXPIRED
    return BatchStatus.COMPLETED


def _write_results(session: Session, settings: Settings, batch: Batch) -> None:
    """Writes the output and error files and ends the batch (not committed: the caller's finalizing holds)."""
    jobs = session.scalars(select(Job).where(Job.batch_id == batch.id).order_by(Job.batch_line)).all()
    ending = _ending(batch, jobs)
    output, errors = [], [(e["line"], _refused_line(e)) for e in batch.line_errors.get("data", [])]
    for job in jobs:
        if job.status == JobStatus.SUCCEEDED:
            output.append(_answer_line(batch, job))
        else:
            errors.append((job.batch_line or 0, _error_line(job, ending)))
    errors.sort(key=lambda pair: pair[0])
    batch.output_file_id = _store_lines(session, settings, batch, "output", output)
    batch.error_file_id = _store_lines(session, settings, batch, "errors", [line for _, line in errors])
    batch.status, batch.completed, batch.failed = ending, len(output), len(errors)
    if ending == BatchStatus.CANCELLED:
        batch.cancelled_at = utcnow()
    elif ending == BatchStatus.COMPLETED:
        batch.completed_at = utcnow()


def _answer_line(batch: Batch, job: Job) -> dict[str, Any]:
    result = GenerationResult.model_validate(job.result)
    created = int(job.created_at.timestamp())
    body: Any
    if batch.endpoint == "/v1/chat/completions":
        body = chat_completion(job.id, created, job.model, result)
    else:
        prompts = GenerationParams.model_validate(job.params).prompts
        choices = completion_choices(result, prompts, 1, False)
        body = Completion(id=job.id, created=created, model=job.model, choices=choices, usage=result.usage)
    response = {"status_code": 200, "request_id": job.id, "body": body.model_dump(mode="json")}
    return {"id": f"batch_req_{job.id}", "custom_id": job.custom_id, "response": response, "error": None}


def _error_line(job: Job, ending: BatchStatus) -> dict[str, Any]:
    error: dict[str, Any]
    if job.status == JobStatus.CANCELLED and ending == BatchStatus.EXPIRED:
        error = {"code": "batch_expired", "message": "the batch's completion window ended before this request ran"}
    elif job.status == JobStatus.CANCELLED:
        error = {"code": "batch_cancelled", "message": "the batch was cancelled before this request finished"}
    else:
        error = {"code": str((job.error or {}).get("code", "failed")), "message": (job.error or {}).get("message")}
    error["line"] = job.batch_line
    return {"id": f"batch_req_{job.id}", "custom_id": job.custom_id, "response": None, "error": error}


def _refused_line(entry: dict[str, Any]) -> dict[str, Any]:
    error = {"code": entry["code"], "message": entry["message"], "line": entry["line"]}
    return {"id": f"batch_req_line_{entry['line']}", "custom_id": entry["custom_id"], "response": None, "error": error}


def _store_lines(
    session: Session, settings: Settings, batch: Batch, name: str, lines: list[dict[str, Any]]
) -> str | None:
    """Stores JSONL lines as a file of the tenant (purpose batch_output) and adds its row (not committed); its
    id (None when there are no lines)."""
    if not lines:
        return None
    file_id = new_id("file")
    data = "".join(_jsonl_line(line) for line in lines).encode()
    key = artifacts.file_key(file_id)
    ArtifactStore.from_settings(settings).put_bytes(data, key)
    session.add(
        File(
            id=file_id,
            tenant=batch.tenant,
            filename=f"{batch.id}_{name}.jsonl",
            purpose="batch_output",
            bytes=len(data),
            records=len(lines),
            sha256=hashlib.sha256(data).hexdigest(),
            path=key,
            created_at=utcnow(),
        )
    )
    return file_id


# Characters str.splitlines() (and other line splitters) break lines at that JSON leaves as they are (it escapes
# the control characters below U+0020 already).
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _jsonl_line(value: dict[str, Any]) -> str:
    """One line of a JSONL file: UTF-8 text as it is, except characters any reader might split a line at."""
    return json.dumps(value, ensure_ascii=False).translate(_LINE_BREAKS) + "\n"
