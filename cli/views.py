"""Jobs, files, events and models as terminal text (plain lines and rich tables, never markup from data)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from rich.table import Table
from rich.text import Text

from shared.schemas import (
    FileObject,
    FineTuningEvent,
    FineTuningJob,
    GenerationJob,
    JobSummary,
    ModelObject,
)


def local_time(moment: datetime | int | None) -> str:
    """A timestamp (datetime or unix seconds) in local time, to the second; "-" for None."""
    if moment is None:
        return "-"
    if isinstance(moment, int):
        moment = datetime.fromtimestamp(moment, UTC)
    elif moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # the database's datetimes are UTC
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def size(n: int) -> str:
    """A byte count for people: 512 B, 12.3 kB, 4.0 MB."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"


def duration(seconds: float | None) -> str:
    """Seconds for people: 0.35 s, 42 s, 3m 05s, 2h 10m; "-" for None."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.2f} s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60}m {whole % 60:02d}s"
    return f"{whole // 3600}h {whole % 3600 // 60:02d}m"


def jobs_table(jobs: Sequence[JobSummary]) -> Table:
    """One row per job: id, kind, status, model, created, error."""
    table = Table(box=None, pad_edge=False)
    table.add_column("ID", no_wrap=True)
    table.add_column("KIND")
    table.add_column("STATUS")
    table.add_column("MODEL", overflow="fold")
    table.add_column("CREATED", no_wrap=True)
    table.add_column("ERROR", overflow="fold")
    for job in jobs:
        error = f"{job.error.code}: {job.error.message}" if job.error else ""
        table.add_row(job.id, job.kind, str(job.status), Text(job.model), local_time(job.created_at), Text(error))
    return table


def models_table(models: Sequence[ModelObject]) -> Table:
    """One row per model: id, parent (the base of a fine-tuned model), created."""
    table = Table(box=None, pad_edge=False)
    table.add_column("ID", overflow="fold")
    table.add_column("PARENT", overflow="fold")
    table.add_column("CREATED", no_wrap=True)
    for model in models:
        created = local_time(model.created) if model.created else "-"  # the base model says 0
        table.add_row(Text(model.id), Text(model.parent or "-"), created)
    return table


def file_line(file: FileObject) -> str:
    """id, name, records and size of an uploaded file."""
    return f"{file.id}  {file.filename}  {file.records} records  {size(file.bytes)}"


def event_line(event: FineTuningEvent) -> str:
    """time, level (when not info) and message of one event."""
    level = "" if event.level == "info" else f"{event.level.upper()} "
    return f"{local_time(event.created_at)}  {level}{event.message}"


def generation_lines(job: GenerationJob) -> list[str]:
    """A generation job's status, timing, usage and outputs."""
    lines = [
        f"{job.id}  generate  {job.status}",
        f"model     {job.model}",
        f"created   {local_time(job.created_at)}  (queued {duration(job.queue_seconds)}, "
        f"ran {duration(job.run_seconds)}, attempt {job.attempt})",
    ]
    if job.usage is not None:
        lines.append(f"usage     {job.usage.prompt_tokens} prompt + {job.usage.completion_tokens} completion tokens")
    if job.error is not None:
        lines.append(f"error     {job.error.code}: {job.error.message}")
    for output in job.outputs or []:
        lines.append(f"[{output.index}] {output.finish_reason}, {output.completion_tokens} tokens: {output.text}")
    return lines


def _metric(metrics: dict[str, Any] | None, key: str) -> str | None:
    value = (metrics or {}).get(key)
    if isinstance(value, float):
        return f"{value:.4f}"
    return None if value is None else str(value)


def fine_tune_lines(job: FineTuningJob) -> list[str]:
    """A fine-tuning job's status, data, progress, result and error."""
    lines = [f"{job.id}  train  {job.status}", f"model     {job.model}"]
    data = job.training_file or (f"{job.dataset['name']} (hub)" if job.dataset else "-")
    if job.validation_file:
        data += f", validation {job.validation_file}"
    lines.append(f"data      {data}")
    hp = job.hyperparameters
    lines.append(
        f"settings  {hp.n_epochs} epochs, batch {hp.batch_size}, lr x{hp.learning_rate_multiplier:g}, seed {job.seed}"
    )
    lines.append(f"created   {local_time(job.created_at)}  finished {local_time(job.finished_at)}")
    metrics = job.metrics or {}
    step, total = metrics.get("step"), metrics.get("total_steps")
    progress = []
    if step is not None:
        progress.append(f"step {step}/{total if total is not None else '?'}")
    for key, label in (("train_loss", "loss"), ("val_loss", "val loss")):
        value = _metric(metrics, key)
        if value is not None:
            progress.append(f"{label} {value}")
    if job.trained_tokens is not None:
        progress.append(f"{job.trained_tokens} tokens")
    if job.estimated_finish is not None:
        progress.append(f"ETA {local_time(job.estimated_finish)}")
    if progress:
        lines.append(f"progress  {', '.join(progress)}")
    if job.fine_tuned_model:
        lines.append(f"result    {job.fine_tuned_model}")
    if job.error is not None:
        lines.append(f"error     {job.error.code}: {job.error.message}")
    return lines
