"""Which models the service serves, and resolving a requested model name to one of them."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.errors import ModelNotFound
from shared.models import FineTunedModel
from shared.schemas import ModelObject
from shared.settings import Settings


def _base(settings: Settings) -> ModelObject:
    return ModelObject(id=settings.base_model, created=0, root=settings.base_model)


def _fine_tuned(row: FineTunedModel) -> ModelObject:
    return ModelObject(id=row.id, created=int(row.created_at.timestamp()), parent=row.base_model, root=row.base_model)


def list_models(session: Session, settings: Settings) -> list[ModelObject]:
    """The base model, then every fine-tuned model newest first."""
    rows = session.scalars(select(FineTunedModel).order_by(FineTunedModel.created_at.desc())).all()
    return [_base(settings), *(_fine_tuned(r) for r in rows)]


def find_model(session: Session, settings: Settings, model_id: str) -> ModelObject | None:
    """The served model with this id, or None."""
    if model_id == settings.base_model:
        return _base(settings)
    row = session.get(FineTunedModel, model_id)
    return _fine_tuned(row) if row is not None else None


def resolve_model(session: Session, settings: Settings, requested: str | None) -> tuple[str, str]:
    """(model id, base model it runs on) for a request's model, the base model when it names none.

    Raises ModelNotFound for a model this service does not serve.
    """
    model = find_model(session, settings, requested or settings.base_model)
    if model is None:
        raise ModelNotFound(f"model {requested!r} does not exist")
    return model.id, model.root
