"""Exports of a fine-tune (llmq extension): a standalone Hugging Face model, merged and dequantized by a train
worker, as a downloadable file. Create, list, read."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from gateway import owned, views
from gateway.auth import TenantDep
from gateway.deps import SessionDep, SettingsDep
from gateway.errors import BODY_ERRORS, V1_ERRORS, JobNotFound, JobStateConflict, ModelNotFound, documented
from gateway.submission import submit
from shared.job_data import ExportParams
from shared.models import Checkpoint, Job
from shared.schemas import ExportRequest, FineTuningExport, FineTuningExportList
from shared.statuses import JobStatus

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], responses=V1_ERRORS)


class JobNotExportable(JobStateConflict):
    """The fine-tune has no model to export: it did not succeed and no checkpoint was named."""

    code = "job_not_succeeded"


@router.post(
    "/{job_id}/export", status_code=202, response_model=FineTuningExport, responses=BODY_ERRORS | documented(404, 409)
)
def create_export(
    job_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep, body: ExportRequest | None = None
) -> FineTuningExport:
    """Queues an export of the job's fine-tuned model (or of one of its checkpoints) merged into its base in
    float16 or float32; poll it until `succeeded`, then download `file_id`. 409 when the job did not succeed
    and no checkpoint is named; 404 for a checkpoint of another job."""
    body = body or ExportRequest()
    job = owned.job_or_404(session, tenant, job_id, kind="train")
    model = _exported_model(session, tenant, job, body.checkpoint)
    params = ExportParams(fine_tuning_job_id=job.id, dtype=body.dtype, checkpoint=body.checkpoint)
    export = submit(
        session, settings, kind="export", model=model, base_model=job.base_model, params=params, tenant=tenant,
        event=f"Created export of {model} ({body.dtype})",
    )  # fmt: skip
    return views.export(export)


def _exported_model(session: Session, tenant: str, job: Job, checkpoint: str | None) -> str:
    """The model id the export merges: the named checkpoint of this job, else the job's fine-tuned model."""
    if checkpoint is not None:
        found = owned.checkpoint_model(session, tenant, checkpoint)
        if found is None or found[0].id != job.id:
            raise ModelNotFound(f"checkpoint: {checkpoint!r} is not a checkpoint of fine-tuning job {job.id!r}")
        return checkpoint
    if job.status != JobStatus.SUCCEEDED:
        has_checkpoint = session.scalars(select(Checkpoint.id).where(Checkpoint.job_id == job.id)).first() is not None
        hint = "name one of its checkpoints in `checkpoint`" if has_checkpoint else "it has no checkpoint either"
        raise JobNotExportable(f"fine-tuning job {job.id!r} is {job.status}, not succeeded; {hint}")
    model = owned.fine_tuned_model(session, tenant, views.fine_tuned_model_of(job))
    if model is None:
        raise ModelNotFound(f"the fine-tuned model of job {job.id!r} was deleted")
    return model.id


@router.get("/{job_id}/exports", response_model=FineTuningExportList, responses=documented(404))
def list_exports(
    job_id: str,
    session: SessionDep,
    tenant: TenantDep,
    after: Annotated[str | None, Query(description="Id of the last export of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> FineTuningExportList:
    """The job's exports, newest first."""
    owned.job_or_404(session, tenant, job_id, kind="train")
    query = (
        select(Job)
        .where(Job.kind == "export", Job.tenant == tenant, Job.params["fine_tuning_job_id"].as_string() == job_id)
        .order_by(Job.created_at.desc(), Job.id.desc())
    )
    if after is not None:
        cursor = owned.job_or_404(session, tenant, after, kind="export")
        query = query.where(
            or_(Job.created_at < cursor.created_at, and_(Job.created_at == cursor.created_at, Job.id < cursor.id))
        )
    rows = session.scalars(query.limit(limit + 1)).all()
    return FineTuningExportList(data=views.readable(rows[:limit], views.export), has_more=len(rows) > limit)


@router.get("/{job_id}/exports/{export_id}", response_model=FineTuningExport, responses=documented(404))
def get_export(job_id: str, export_id: str, session: SessionDep, tenant: TenantDep) -> FineTuningExport:
    """One export: its status, and its file once it succeeded."""
    export = owned.job_or_404(session, tenant, export_id, kind="export")
    view = views.export(export)
    if view.fine_tuning_job_id != job_id:
        raise JobNotFound(f"export {export_id!r} of fine-tuning job {job_id!r} not found")
    return view
