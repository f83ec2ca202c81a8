"""Which models the service serves, and resolving a requested model name to one of them."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from gateway import owned, pg
from gateway.errors import ModelNotFound
from gateway.front_door import FrontDoor
from shared.db import get_sessionmaker
from shared.models import FineTunedModel
from shared.schemas import ModelObject
from shared.settings import Settings


def _base(model_id: str) -> ModelObject:
    return ModelObject(id=model_id, created=0, root=model_id)


def _fine_tuned(row: FineTunedModel) -> ModelObject:
    # parent: the model it continued from (manifest parent_model), else its base.
    parent = row.manifest.get("parent_model") if isinstance(row.manifest, dict) else None
    created = int(row.created_at.timestamp())
    return ModelObject(id=row.id, created=created, parent=parent or row.base_model, root=row.base_model)


def list_models(session: Session, settings: Settings, tenant: str) -> list[ModelObject]:
    """The base models, then the tenant's fine-tuned models newest first."""
    rows = session.scalars(
        select(FineTunedModel)
        .where(FineTunedModel.tenant == tenant, FineTunedModel.deleted_at.is_(None))
        .order_by(FineTunedModel.created_at.desc())
    ).all()
    return [*(_base(m) for m in settings.base_models), *(_fine_tuned(r) for r in rows)]


def find_model(session: Session, settings: Settings, tenant: str, model_id: str) -> ModelObject | None:
    """The served model with this id (a base model, one of the tenant's fine-tuned models or one of their
    checkpoints), or None."""
    if model_id in settings.base_models:
        return _base(model_id)
    row = owned.fine_tuned_model(session, tenant, model_id)
    if row is not None:
        return _fine_tuned(row)
    found = owned.checkpoint_model(session, tenant, model_id)
    if found is None:
        return None
    job, checkpoint = found
    created = int(checkpoint.created_at.timestamp())
    return ModelObject(id=model_id, created=created, parent=job.model, root=job.base_model)


def resolve_model(session: Session, settings: Settings, tenant: str, requested: str | None) -> tuple[str, str]:
    """(model id, base model it runs on) for a request's model, the base model when it names none.

    Raises ModelNotFound for a model this service does not serve.
    """
    model = find_model(session, settings, tenant, requested or settings.base_model)
    if model is None:
        raise ModelNotFound(f"model {requested!r} does not exist")
    return model.id, model.root


async def resolve_model_async(
    door: FrontDoor, settings: Settings, tenant: str, requested: str | None
) -> tuple[str, str]:
    """resolve_model from the event loop: a base model needs no database; a fine-tuned one is read through the
    asyncpg pool (Postgres) or a session in a worker thread."""
    model_id = requested or settings.base_model
    if model_id in settings.base_models:
        return model_id, model_id
    if door.pg is None:
        return await run_in_threadpool(_resolve_in_session, settings, tenant, requested)
    row = await pg.fine_tuned_model_row(door.pg, model_id)
    if row is None or row["tenant"] != tenant:
        raise ModelNotFound(f"model {requested!r} does not exist")
    return model_id, str(row["base_model"])


def _resolve_in_session(settings: Settings, tenant: str, requested: str | None) -> tuple[str, str]:
    with get_sessionmaker()() as session:
        return resolve_model(session, settings, tenant, requested)
