"""Conversions from job rows to the API's response models."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, Protocol, TypeVar

from shared.job_data import (
    ExportParams,
    ExportResult,
    FineTuneParams,
    FineTuneResult,
    GenerationParams,
    GenerationResult,
    JobError,
)
from shared.model_ids import checkpoint_model_id, fine_tuned_model_id
from shared.models import Checkpoint, File, Job, JobEvent
from shared.schemas import (
    FileObject,
    FineTuningCheckpoint,
    FineTuningEvent,
    FineTuningExport,
    FineTuningJob,
    FineTuningJobError,
    FineTuningJobHyperparameters,
    FineTuningJobProgress,
    GenerationJob,
    JobSummary,
)
from shared.statuses import JobStatus

log = logging.getLogger(__name__)

Row = TypeVar("Row")
View = TypeVar("View")


def readable(rows: Iterable[Row], view: Callable[[Row], View]) -> list[View]:
    """The view of every row that has one. A row no view can read (a shape an older or broken writer left) is
    logged and left out, so one bad row never fails a whole list; GET of that row alone still fails."""
    views = []
    for row in rows:
        try:
            views.append(view(row))
        except (KeyError, TypeError, ValueError, AttributeError):  # pydantic's ValidationError is a ValueError
            log.exception("row %s cannot be shown; left out of the list", getattr(row, "id", "?"))
    return views


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds(), 6)


class JobView(Protocol):
    """What the generation view reads of a job: a Job, or a gateway.pg.JobRow read without the ORM."""

    @property
    def id(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def params(self) -> dict[str, Any]: ...
    @property
    def result(self) -> dict[str, Any] | None: ...
    @property
    def error(self) -> dict[str, Any] | None: ...
    @property
    def attempt(self) -> int: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def started_at(self) -> datetime | None: ...
    @property
    def finished_at(self) -> datetime | None: ...


def job_error(job: JobView) -> JobError | None:
    """The error a failed job's worker wrote, if any."""
    return JobError.model_validate(job.error) if job.error is not None else None


def generation_job(job: JobView) -> GenerationJob:
    """A generation job row as the client sees it."""
    params = GenerationParams.model_validate(job.params)
    result = GenerationResult.model_validate(job.result) if job.result is not None else None
    return GenerationJob(
        id=job.id,
        status=job.status,
        model=job.model,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        queue_seconds=_seconds(job.created_at, job.started_at),
        run_seconds=_seconds(job.started_at, job.finished_at),
        attempt=job.attempt,
        request=params.model_dump(exclude_unset=True),
        outputs=result.outputs if result is not None else None,
        usage=result.usage if result is not None else None,
        error=job_error(job),
    )


def job_summary(job: Job) -> JobSummary:
    """Any job row as one line of a listing."""
    return JobSummary(
        id=job.id,
        kind=job.kind,
        status=job.status,
        model=job.model,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        attempt=job.attempt,
        error=job_error(job),
    )


def _unix(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment is not None else None


def file_object(row: File) -> FileObject:
    """A file row in OpenAI's file shape."""
    return FileObject(
        id=row.id,
        bytes=row.bytes,
        created_at=int(row.created_at.timestamp()),
        filename=row.filename,
        purpose=row.purpose,
        records=row.records,
        sha256=row.sha256,
    )


def fine_tuning_job(job: Job) -> FineTuningJob:
    """A train job row in OpenAI's fine-tuning job shape, with progress while it runs."""
    params = FineTuneParams.model_validate(job.params)
    result = FineTuneResult.model_validate(job.result) if job.result is not None else FineTuneResult()
    hp = params.hyperparameters
    running = job.status == JobStatus.RUNNING
    error = job_error(job)
    return FineTuningJob(
        id=job.id,
        created_at=int(job.created_at.timestamp()),
        finished_at=_unix(job.finished_at),
        model=job.model,
        fine_tuned_model=result.fine_tuned_model,
        status=job.status,
        training_file=params.training_file,
        validation_file=params.validation_file,
        hyperparameters=FineTuningJobHyperparameters.model_validate(hp),
        method={"type": "supervised", "supervised": {"hyperparameters": hp}},
        result_files=result.result_files,
        trained_tokens=result.trained_tokens,
        estimated_finish=_unix(result.estimated_finish) if running else None,
        error=FineTuningJobError(code=error.code, message=error.message) if error is not None else None,
        seed=params.seed,
        user_provided_suffix=params.suffix,
        metadata=params.metadata,
        dataset=params.dataset,
        metrics=result.metrics,
        progress=_progress(result) if running else None,
        samples=result.samples,
    )


def _progress(result: FineTuneResult) -> FineTuningJobProgress | None:
    """The progress figures the worker writes on a running job's row (job_states.record_progress), if any."""
    if result.step is None or result.total_steps is None:
        return None
    return FineTuningJobProgress(step=result.step, total_steps=result.total_steps, train_loss=result.train_loss)


EVENT_PREFIX = "ftevent-"


def event_number(event_id: str) -> int:
    """The row number inside an event id (ftevent-<n>); 0 for anything else."""
    number = event_id.removeprefix(EVENT_PREFIX)
    return int(number) if number.isdigit() else 0


def event(row: JobEvent) -> FineTuningEvent:
    """A job event in OpenAI's fine-tuning event shape."""
    return FineTuningEvent(
        id=f"{EVENT_PREFIX}{row.id}",
        created_at=int(row.created_at.timestamp()),
        level=row.level,
        message=row.message,
        type=row.type,
        data=row.data,
    )


def fine_tuned_model_of(job: Job) -> str:
    """The model id a fine-tune has (or will have once it succeeds); its checkpoints' ids extend it."""
    return fine_tuned_model_id(job.base_model, FineTuneParams.model_validate(job.params).suffix, job.id)


def checkpoint(job: Job, row: Checkpoint) -> FineTuningCheckpoint:
    """A checkpoint row in OpenAI's fine-tuning checkpoint shape; its fine_tuned_model_checkpoint is a model
    id that generations and completions accept."""
    return FineTuningCheckpoint(
        id=row.id,
        created_at=int(row.created_at.timestamp()),
        fine_tuned_model_checkpoint=checkpoint_model_id(fine_tuned_model_of(job), row.step),
        fine_tuning_job_id=job.id,
        step_number=row.step,
        # OpenAI's SDK reads valid_loss; the worker records val_loss.
        metrics=row.metrics | ({"valid_loss": row.metrics["val_loss"]} if "val_loss" in row.metrics else {}),
    )


def export(job: Job) -> FineTuningExport:
    """An export job row as the client sees it: its file once it succeeded."""
    params = ExportParams.model_validate(job.params)
    result = ExportResult.model_validate(job.result) if job.result is not None else None
    return FineTuningExport(
        id=job.id,
        fine_tuning_job_id=params.fine_tuning_job_id,
        model=job.model,
        base_model=job.base_model,
        dtype=params.dtype,
        status=JobStatus(job.status),
        file_id=result.file_id if result is not None else None,
        bytes=result.bytes if result is not None else None,
        error=job_error(job),
        created_at=int(job.created_at.timestamp()),
        finished_at=_unix(job.finished_at),
    )
