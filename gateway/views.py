"""Conversions from job rows to the API's response models."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, TypeVar

from shared.models import Checkpoint, File, Job, JobEvent
from shared.schemas import (
    ErrorInfo,
    FileObject,
    FineTuningCheckpoint,
    FineTuningEvent,
    FineTuningJob,
    FineTuningJobHyperparameters,
    FineTuningJobProgress,
    GenerationJob,
    GenerationOutput,
    JobSummary,
    OpenAIError,
    Usage,
)

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


def generation_job(job: Job) -> GenerationJob:
    """A generation job row as the client sees it."""
    result = job.result or {}
    outputs = [GenerationOutput(**o) for o in result["outputs"]] if "outputs" in result else None
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
        request=job.params,
        outputs=outputs,
        usage=Usage(**result["usage"]) if "usage" in result else None,
        error=ErrorInfo(**job.error) if job.error else None,
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
        error=ErrorInfo(**job.error) if job.error else None,
    )


def _unix(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment is not None else None


def _unix_seconds(value: object) -> int | None:
    """Unix seconds from what the worker wrote: an ISO time or a number."""
    if isinstance(value, str):
        return int(datetime.fromisoformat(value).timestamp())
    return int(value) if isinstance(value, int | float) else None


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
    params, result = job.params, job.result or {}
    hp = params["hyperparameters"]
    estimated = _unix_seconds(result.get("estimated_finish"))
    return FineTuningJob(
        id=job.id,
        created_at=int(job.created_at.timestamp()),
        finished_at=_unix(job.finished_at),
        model=job.model,
        fine_tuned_model=result.get("fine_tuned_model"),
        status=job.status,
        training_file=params["training_file"],
        validation_file=params["validation_file"],
        hyperparameters=FineTuningJobHyperparameters(
            n_epochs=hp["n_epochs"],
            batch_size=hp["batch_size"],
            learning_rate_multiplier=hp["learning_rate_multiplier"],
        ),
        method={"type": "supervised", "supervised": {"hyperparameters": hp}},
        result_files=result.get("result_files", []),
        trained_tokens=result.get("trained_tokens"),
        estimated_finish=estimated if job.status == "running" else None,
        error=OpenAIError(**job.error) if job.error else None,
        seed=params["seed"],
        user_provided_suffix=params["suffix"],
        metadata=params["metadata"],
        dataset=params["dataset"],
        metrics=result.get("metrics"),
        progress=_progress(result) if job.status == "running" else None,
    )


def _progress(result: dict[str, Any]) -> FineTuningJobProgress | None:
    """The progress figures the worker writes on a running job's row (job_states.record_progress), if any."""
    if "step" not in result or "total_steps" not in result:
        return None
    return FineTuningJobProgress(
        step=result["step"], total_steps=result["total_steps"], train_loss=result.get("train_loss")
    )


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


def checkpoint(job: Job, row: Checkpoint) -> FineTuningCheckpoint:
    """A checkpoint row in OpenAI's fine-tuning checkpoint shape."""
    return FineTuningCheckpoint(
        id=row.id,
        created_at=int(row.created_at.timestamp()),
        fine_tuned_model_checkpoint=f"{job.id}:ckpt-step-{row.step}",
        fine_tuning_job_id=job.id,
        step_number=row.step,
        # OpenAI's SDK reads valid_loss; the worker records val_loss.
        metrics=row.metrics | ({"valid_loss": row.metrics["val_loss"]} if "val_loss" in row.metrics else {}),
    )
