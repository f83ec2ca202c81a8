"""Which models the service serves, and resolving a requested model name to one of them."""

from __future__ import annotations

from sqlalchemy.orm import Session

from gateway.errors import ModelNotFound
from shared.settings import Settings


def served_models(session: Session, settings: Settings) -> list[str]:
    """Ids of every model a generation job may name: the base model (adapters come later)."""
    return [settings.base_model]


def resolve_model(session: Session, settings: Settings, requested: str | None) -> tuple[str, str]:
    """(model id, base model it runs on) for a request's model, the base model when it names none.

    Raises ModelNotFound for a model this service does not serve.
    """
    if requested is None:
        return settings.base_model, settings.base_model
    if requested not in served_models(session, settings):
        raise ModelNotFound(f"model {requested!r} does not exist")
    return requested, settings.base_model
