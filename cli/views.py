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
    QueueState,
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


def queue_text(queue: QueueState, kind: str) -> str:
    """Where a queued job stands: 'position 2; no train worker is alive: ...'."""
    if queue.worker_alive:
        plural = "" if queue.live_workers == 1 else "s"
        return f"position {queue.position}; {queue.live_workers} {kind} worker{plural} alive"
    return (
        f"position {queue.position}; no {kind} worker is alive: it waits until one starts (llmq worker --queue {kind})"
    )


def settings_text(job: FineTuningJob) -> str:
    """The settings the job runs with, as the worker resolved them (max_steps, learning rate, ...)."""
    hp = (job.method.get("supervised") or {}).get("hyperparameters") or {}
    parts = []
    if hp.get("max_steps") is not None:
        parts.append(f"max_steps {hp['max_steps']}")
    else:
        parts.append(f"{hp.get('n_epochs', job.hyperparameters.n_epochs)} epochs")
    parts.append(f"batch {hp.get('batch_size', job.hyperparameters.batch_size)}")
    if isinstance(hp.get("learning_rate"), int | float):
        parts.append(f"lr {hp['learning_rate']:g}")
    else:
        parts.append(f"lr x{job.hyperparameters.learning_rate_multiplier:g}")
    for key, label in (("lora_r", "LoRA r"), ("max_seq_len", "max_seq_len")):
        if hp.get(key) is not None:
            parts.append(f"{label} {hp[key]}")
    parts.append(f"seed {job.seed}")
    return ", ".join(parts)


def progress_parts(job: FineTuningJob) -> list[str]:
    """Step, total and losses: live progress while it runs, the final figures once it ended.

    "train loss" is the mean training loss of the steps since the previous report while running; at the end,
    "final train loss" is that of the last report and "mean train loss" the mean over the whole run."""
    metrics = job.metrics or {}
    parts = []
    if job.progress is not None:
        parts.append(f"step {job.progress.step}/{job.progress.total_steps}")
        if job.progress.train_loss is not None:
            parts.append(f"train loss {job.progress.train_loss:.4f} (recent steps)")
    else:
        step, total = metrics.get("step", metrics.get("steps")), metrics.get("total_steps")
        if step is not None:
            parts.append(f"step {step}/{total if total is not None else step}")
        for key, label in (("final_train_loss", "final train loss"), ("train_loss", "mean train loss")):
            value = _metric(metrics, key)
            if value is not None:
                parts.append(f"{label} {value}")
    value = _metric(metrics, "val_loss")
    if value is not None:
        parts.append(f"val loss {value}")
    if job.trained_tokens is not None:
        parts.append(f"{job.trained_tokens} tokens")
    if job.estimated_finish is not None:
        parts.append(f"ETA {local_time(job.estimated_finish)}")
    return parts


def fine_tune_lines(job: FineTuningJob) -> list[str]:
    """A fine-tuning job's status, data, progress, result and error."""
    lines = [f"{job.id}  train  {job.status}", f"model     {job.model}"]
    if job.queue is not None:
        lines.append(f"queue     {queue_text(job.queue, 'train')}")
    data = job.training_file or (f"{job.dataset['name']} (hub)" if job.dataset else "-")
    if job.validation_file:
        data += f", validation {job.validation_file}"
    lines.append(f"data      {data}")
    lines.append(f"settings  {settings_text(job)}")
    lines.append(f"created   {local_time(job.created_at)}  finished {local_time(job.finished_at)}")
    progress = progress_parts(job)
    if progress:
        lines.append(f"progress  {', '.join(progress)}")
    if job.fine_tuned_model:
        lines.append(f"result    {job.fine_tuned_model}")
    if job.error is not None:
        lines.append(f"error     {job.error.code}: {job.error.message}")
    return lines
