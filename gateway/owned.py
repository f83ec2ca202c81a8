"""Reading rows as a tenant: another tenant's row is the same as no row (404, never 403)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from shared.models import File, FineTunedModel, Job


def job(session: Session, tenant: str, job_id: str, kind: str | None = None) -> Job | None:
    """The tenant's job with this id (of this kind, if given), or None."""
    row = session.get(Job, job_id)
    if row is None or row.tenant != tenant or (kind is not None and row.kind != kind):
        return None
    return row


def file(session: Session, tenant: str, file_id: str) -> File | None:
    """The tenant's file with this id, or None."""
    row = session.get(File, file_id)
    return row if row is not None and row.tenant == tenant else None


def fine_tuned_model(session: Session, tenant: str, model_id: str) -> FineTunedModel | None:
    """The tenant's fine-tuned model with this id, or None."""
    row = session.get(FineTunedModel, model_id)
    return row if row is not None and row.tenant == tenant else None
