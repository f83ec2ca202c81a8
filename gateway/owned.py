"""Reading rows as a tenant: another tenant's row is the same as no row (404, never 403)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.errors import FileNotFound, JobNotFound
from gateway.pg import JobRow
from shared.job_data import FineTuneParams, JobKind
from shared.model_ids import fine_tuned_model_id, parse_checkpoint_id
from shared.models import Checkpoint, File, FineTunedModel, Job

# How a 404 names a job it did not find, by the kind the route serves.
JOB_NOUN: dict[JobKind | None, str] = {
    None: "job",
    "generate": "generation job",
    "train": "fine-tuning job",
    "export": "export",
}


def job(session: Session, tenant: str, job_id: str, kind: JobKind | None = None) -> Job | None:
    """The tenant's job with this id (of this kind, if given), or None."""
    row = session.get(Job, job_id)
    if row is None or row.tenant != tenant or (kind is not None and row.kind != kind):
        return None
    return row


def checked(row: JobRow | None, tenant: str, job_id: str, kind: JobKind | None = None) -> JobRow:
    """job_or_404 for a row read without a session (gateway.pg.job_row)."""
    if row is None or row.tenant != tenant or (kind is not None and row.kind != kind):
        raise JobNotFound(f"{JOB_NOUN[kind]} {job_id!r} not found")
    return row


def job_or_404(session: Session, tenant: str, job_id: str, kind: JobKind | None = None) -> Job:
    """The tenant's job with this id (of this kind, if given); JobNotFound (404) otherwise."""
    row = job(session, tenant, job_id, kind)
    if row is None:
        raise JobNotFound(f"{JOB_NOUN[kind]} {job_id!r} not found")
    return row


def file(session: Session, tenant: str, file_id: str) -> File | None:
    """The tenant's file with this id, or None."""
    row = session.get(File, file_id)
    return row if row is not None and row.tenant == tenant else None


def file_or_404(session: Session, tenant: str, file_id: str) -> File:
    """The tenant's file with this id; FileNotFound (404) otherwise."""
    row = file(session, tenant, file_id)
    if row is None:
        raise FileNotFound(f"file {file_id!r} not found")
    return row


def fine_tuned_model(session: Session, tenant: str, model_id: str) -> FineTunedModel | None:
    """The tenant's fine-tuned model with this id, or None."""
    row = session.get(FineTunedModel, model_id)
    return row if row is not None and row.tenant == tenant and row.deleted_at is None else None


def checkpoint_model(session: Session, tenant: str, model_id: str) -> tuple[Job, Checkpoint] | None:
    """The tenant's fine-tune and its checkpoint that a checkpoint model id names (any status: a cancelled
    job's checkpoints serve too), or None."""
    ref = parse_checkpoint_id(model_id)
    row = job(session, tenant, ref.job_id, kind="train") if ref is not None else None
    if ref is None or row is None:
        return None
    if fine_tuned_model_id(row.base_model, FineTuneParams.model_validate(row.params).suffix, row.id) != ref.model_id:
        return None
    found = session.scalars(select(Checkpoint).where(Checkpoint.job_id == row.id, Checkpoint.step == ref.step)).first()
    return (row, found) if found is not None else None
