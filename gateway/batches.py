"""OpenAI batches on the job queue: create (each valid line a generation job at batch priority), cancel, and
finalize (the output and error JSONL files, built from the job rows once none is active).

Finalizing happens lazily, when a client reads the batch (GET or list) and no job of it is queued, running or
paused; a conditional UPDATE to `finalizing` lets one gateway (of several) write the files. A gateway that
dies while finalizing leaves the batch `finalizing`; after FINALIZE_STALE another read takes it over.
The output holds one line per custom_id, built from the jobs' rows: a retried job has one row, so it never
answers twice.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, or_, select, update
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

FINALIZE_STALE = timedelta(minutes=5)
ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.PAUSED)


class BatchNotFound(NotFound):
    code = "batch_not_found"


class InvalidBatchInput(ApiError):
    code = "invalid_input_file"


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
    """Cancels a batch: its queued jobs at once, running ones at their next step; 409 once it has ended."""
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
    """(completed, failed) requests of a batch so far: succeeded jobs; failed jobs and refused lines."""
    if batch.status not in (*RUNNING_STATUSES, BatchStatus.FINALIZING):
        return batch.completed, batch.failed
    by_status = dict(
        session.execute(
            select(Job.status, func.count()).where(Job.batch_id == batch.id).group_by(Job.status)
        ).all()
    )
    refused = len(batch.line_errors.get("data", []))
    return by_status.get(JobStatus.SUCCEEDED, 0), by_status.get(JobStatus.FAILED, 0) + refused


def finalize_if_done(session: Session, settings: Settings, batch: Batch) -> Batch:
    """The batch, finalized first when none of its jobs is active any more and no other gateway is at it."""
    now = utcnow()
    waiting = batch.status in RUNNING_STATUSES
    stale = batch.status == BatchStatus.FINALIZING and (batch.finalizing_at or now) < now - FINALIZE_STALE
    if not (waiting or stale):
        return batch
    active = session.scalar(select(Job.id).where(Job.batch_id == batch.id, Job.status.in_(ACTIVE)).limit(1))
    if active is not None:
        return batch
    ending = BatchStatus.CANCELLED if batch.cancelling_at is not None else BatchStatus.COMPLETED
    taken = session.execute(
        update(Batch)
        .where(
            Batch.id == batch.id,
            or_(
                Batch.status.in_(RUNNING_STATUSES),
                (Batch.status == BatchStatus.FINALIZING) & (Batch.finalizing_at < now - FINALIZE_STALE),
            ),
        )
        .values(status=BatchStatus.FINALIZING, finalizing_at=now)
    )
    session.commit()
    if taken.rowcount == 1:  # type: ignore[attr-defined]
        _write_results(session, settings, batch, ending, now)
    session.refresh(batch)
    return batch


def _write_results(session: Session, settings: Settings, batch: Batch, ending: BatchStatus, taken_at: Any) -> None:
    """Writes the output and error files and ends the batch (only while this gateway's finalizing holds)."""
    jobs = session.scalars(select(Job).where(Job.batch_id == batch.id).order_by(Job.batch_line)).all()
    output, errors = [], [(e["line"], _refused_line(e)) for e in batch.line_errors.get("data", [])]
    for job in jobs:
        if job.status == JobStatus.SUCCEEDED:
            output.append(_answer_line(batch, job))
        else:
            errors.append((job.batch_line or 0, _error_line(job)))
    errors.sort(key=lambda pair: pair[0])
    output_file = _store_lines(session, settings, batch, "output", output)
    error_file = _store_lines(session, settings, batch, "errors", [line for _, line in errors])
    done_at = utcnow()
    moment = {"cancelled_at": done_at} if ending == BatchStatus.CANCELLED else {"completed_at": done_at}
    session.execute(
        update(Batch)
        .where(Batch.id == batch.id, Batch.status == BatchStatus.FINALIZING, Batch.finalizing_at == taken_at)
        .values(
            status=ending,
            output_file_id=output_file,
            error_file_id=error_file,
            completed=len(output),
            failed=sum(1 for job in jobs if job.status == JobStatus.FAILED) + len(batch.line_errors.get("data", [])),
            **moment,
        )
    )
    session.commit()


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


def _error_line(job: Job) -> dict[str, Any]:
    error: dict[str, Any]
    if job.status == JobStatus.CANCELLED:
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
    """Stores JSONL lines as a file of the tenant (purpose batch_output) and commits its row; its id (None
    when there are no lines)."""
    if not lines:
        return None
    file_id = new_id("file")
    data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()
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
    session.commit()
    return file_id
