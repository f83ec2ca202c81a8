"""Which models the service serves, and resolving a requested model name to one of them."""

from __future__ import annotations

from sqlalchemy.orm import Session

from gateway.errors import ModelNotFound
from shared.settings import Settings


def served_models(session: Session, settings: Settings) -> list[str]:
    """Ids of every model a generation job may name: the base model (adapters come later)."""
    return [settings.base_model]


def resolve_model(session: Session, settings: Settings, requested: str | None) -> str:
    """The model id a request names, or the base model when it names none; ModelNotFound if unknown."""
    if requested is None:
        return settings.base_model
    if requested not in served_models(session, settings):
        raise ModelNotFound(f"model {requested!r} does not exist")
    return requested
