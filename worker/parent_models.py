"""The adapter a continued fine-tune starts from: one of the tenant's fine-tuned models or checkpoints, fetched
from the store (checked against its seal), and the chain of models back to the base for the manifest.

The gateway resolved the parent when the job was created; the worker looks again, since the model may have
been deleted since (the job then fails with model_deleted).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from shared.artifacts import ArtifactStore
from shared.job_data import ErrorCode, FineTuneParams
from shared.model_ids import job_of
from shared.models import FineTunedModel, Job
from worker.adapter_cache import StoredAdapter
from worker.checkpoint_models import checkpoint_adapters

MAX_CHAIN = 100  # a lineage longer than this is cut (a chain is built one fine-tune at a time)


class ParentUnavailable(Exception):
    """The model to continue from cannot be used; code says why (model_not_found, model_deleted)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Parent:
    """A fetched starting adapter: its model id, its local folder, and the chain from it back to the base."""

    model_id: str
    folder: Path
    lineage: list[str]  # [parent, its parent, ..., base model]


def fetch_parent(session: Session, store: ArtifactStore, job: Job, model_id: str, into: Path) -> Parent:
    """The parent adapter of a continued fine-tune, fetched into the new local folder `into`."""
    adapter = _stored(session, store, job.tenant, model_id)
    files = adapter.files if adapter.files is not None else store.sizes(adapter.key)
    store.get_sealed(adapter.key, files, into)
    return Parent(model_id=model_id, folder=into, lineage=lineage(session, model_id, job.base_model))


def _stored(session: Session, store: ArtifactStore, tenant: str, model_id: str) -> StoredAdapter:
    owner = session.get(Job, job_of(model_id) or "")
    if owner is None or owner.tenant != tenant:
        raise ParentUnavailable(ErrorCode.MODEL_NOT_FOUND, f"no model {model_id!r} to continue from")
    row = session.get(FineTunedModel, model_id)
    if row is not None and row.deleted_at is not None:
        raise ParentUnavailable(ErrorCode.MODEL_DELETED, f"model {model_id!r} was deleted by its owner")
    if row is not None:
        files = row.manifest.get("files") if isinstance(row.manifest, dict) else None
        return StoredAdapter(key=row.path, files=files)
    found = checkpoint_adapters(session, store, [model_id]).get(model_id)
    if found is None:
        raise ParentUnavailable(ErrorCode.MODEL_NOT_FOUND, f"no model {model_id!r} to continue from")
    return found


def lineage(session: Session, model_id: str, base_model: str) -> list[str]:
    """[model_id, the model it continued from, ..., base_model]: each fine-tune's parent_model, followed."""
    chain: list[str] = []
    current: str | None = model_id
    while current is not None and len(chain) < MAX_CHAIN:
        chain.append(current)
        job = session.get(Job, job_of(current) or "")
        current = FineTuneParams.model_validate(job.params).parent_model if job is not None else None
    return [*chain, base_model]
