"""Models: the base model and every fine-tuned adapter, each with its parent."""

from __future__ import annotations

from fastapi import APIRouter

from gateway.auth import TenantDep
from gateway.catalog import find_model, list_models
from gateway.deps import SessionDep, SettingsDep
from gateway.errors import V1_ERRORS, ModelNotFound, documented
from shared.schemas import ModelList, ModelObject

router = APIRouter(prefix="/v1/models", tags=["models"], responses=V1_ERRORS)


@router.get("", response_model=ModelList)
def get_models(session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> ModelList:
    """Every model a generation may name: the base model and the fine-tuned ones."""
    return ModelList(data=list_models(session, settings, tenant))


@router.get("/{model_id:path}", response_model=ModelObject, responses=documented(404))
def get_model(model_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> ModelObject:
    """One model."""
    model = find_model(session, settings, tenant, model_id)
    if model is None:
        raise ModelNotFound(f"model {model_id!r} does not exist")
    return model
