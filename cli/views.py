"""Jobs, files, events and models as terminal text (plain lines and rich tables, never markup from data)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from rich.console import Group, RenderableType
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


# Tables fit the terminal: ids are never cut (no_wrap), long models and errors fold onto more lines, and a
# narrow terminal gets shorter timestamps and loses the columns an id already says (a job's kind: gen-, ftjob-).
WIDE = 110  # columns from which a table shows full timestamps and every column


def _created(moment: datetime | int | None, width: int) -> str:
    if width >= WIDE or moment is None:
        return local_time(moment)
    return local_time(moment)[5:16]  # MM-DD HH:MM


def iso_time(moment: datetime | int | None) -> str:
    """A timestamp as ISO 8601 UTC (2026-01-01T12:00:00Z), for scripts; "-" for None."""
    if moment is None:
        return "-"
    if isinstance(moment, int):
        moment = datetime.fromtimestamp(moment, UTC)
    elif moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _job_error(job: JobSummary) -> str:
    return f"{job.error.code}: {job.error.message}" if job.error else ""


def jobs_table(jobs: Sequence[JobSummary], width: int) -> RenderableType:
    """One row per job: id, kind, status, created, model, error; fits width columns. On a narrow terminal the
    kind is left out (the id says it: gen-, ftjob-) and errors follow the table, one per failed job."""
    wide = width >= WIDE
    table = Table(box=None, pad_edge=False)
    table.add_column("ID", no_wrap=True, overflow="ignore")
    if wide:
        table.add_column("KIND", no_wrap=True)
    table.add_column("STATUS", no_wrap=True, overflow="ignore")
    table.add_column("CREATED", no_wrap=True, overflow="ignore")
    table.add_column("MODEL", overflow="fold", ratio=1)
    if wide:
        table.add_column("ERROR", overflow="fold", ratio=1)
    for job in jobs:
        cells = [job.id, *([job.kind] if wide else []), str(job.status), _created(job.created_at, width)]
        table.add_row(*cells, Text(job.model), *([Text(_job_error(job))] if wide else []))
    errors = [Text(f"{job.id}  {_job_error(job)}") for job in jobs if job.error and not wide]
    return Group(table, *([Text(""), *errors] if errors else []))


def job_rows(jobs: Sequence[JobSummary]) -> list[str]:
    """One tab-separated line per job for pipes: id, kind, status, created (ISO UTC), model, error."""
    return [
        _tab_line(job.id, job.kind, str(job.status), iso_time(job.created_at), job.model, _job_error(job))
        for job in jobs
    ]


MIN_FOLDED = 16  # the narrowest a folded column is worth showing


def models_table(models: Sequence[ModelObject], width: int) -> Table:
    """One row per model: id, created, parent (the base of a fine-tuned model); fits width columns. The parent
    is left out when long ids leave it too little room (a checkpoint's id starts with its parent's)."""
    created = [_created(m.created, width) if m.created else "-" for m in models]  # the base model says 0
    used = max(len(m.id) for m in models) + 1 + max(len("CREATED"), *(len(c) for c in created)) + 1
    table = Table(box=None, pad_edge=False)
    table.add_column("ID", no_wrap=True, overflow="ignore")
    table.add_column("CREATED", no_wrap=True, overflow="ignore")
    with_parent = width - used >= MIN_FOLDED
    if with_parent:
        table.add_column("PARENT", overflow="fold")
    for model, when in zip(models, created, strict=True):
        table.add_row(Text(model.id), when, *([Text(model.parent or "-")] if with_parent else []))
    return table


def model_rows(models: Sequence[ModelObject]) -> list[str]:
    """One tab-separated line per model for pipes: id, created (ISO UTC, - for the base), parent."""
    return [_tab_line(m.id, iso_time(m.created) if m.created else "-", m.parent or "-") for m in models]


def _tab_line(*cells: str) -> str:
    """Cells joined by tabs, each on one line (tabs and line breaks inside a cell become spaces)."""
    return "\t".join(" ".join(cell.split()) or "-" for cell in cells)


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
    return lines + sample_lines(job)


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split()) or "(empty)"


def sample_lines(job: FineTuningJob) -> list[str]:
    """The fine-tuned model's greedy answers to a few validation prompts, each beside the base model's."""
    if not job.samples:
        return []
    lines = [f"samples   greedy answers to {len(job.samples)} validation prompts"]
    for number, sample in enumerate(job.samples, 1):
        lines.append(f"  [{number}] {_one_line(sample.prompt)}")
        lines.append(f"      fine-tuned  {_one_line(sample.fine_tuned)}")
        if sample.base is not None:
            lines.append(f"      base        {_one_line(sample.base)}")
        if sample.reference is not None:
            lines.append(f"      reference   {_one_line(sample.reference)}")
    return lines
