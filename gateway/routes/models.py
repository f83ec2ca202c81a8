"""Models: the base model and every fine-tuned adapter, each with its parent; deleting a fine-tuned model."""

from __future__ import annotations

from fastapi import APIRouter

from gateway import owned
from gateway.auth import TenantDep
from gateway.catalog import find_model, list_models
from gateway.deps import SessionDep, SettingsDep
from gateway.errors import V1_ERRORS, ModelNotFound, documented
from shared.artifacts import ADAPTER_SEAL, ArtifactStore
from shared.models import utcnow
from shared.schemas import ModelDeleted, ModelList, ModelObject

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


@router.delete("/{model_id:path}", response_model=ModelDeleted, responses=documented(404))
def delete_model(model_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> ModelDeleted:
    """Deletes one of the tenant's fine-tuned models: no longer listed or served (queued jobs naming it fail
    with model_deleted), its adapter removed from the store. Its job, events, checkpoints and result files stay."""
    row = owned.fine_tuned_model(session, tenant, model_id)
    if row is None:
        raise ModelNotFound(f"model {model_id!r} does not exist or is not a fine-tuned model of yours")
    row.deleted_at = utcnow()
    session.commit()
    # After the commit: a reader that still finds the row undeleted finds its adapter too.
    ArtifactStore.from_settings(settings).unseal(row.path, ADAPTER_SEAL)
    return ModelDeleted(id=model_id, deleted=True)
