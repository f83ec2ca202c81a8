"""`llmq finetune --follow`: a live progress bar (step/total, loss, tokens/s, ETA) fed by the job's events.

The worker writes progress as events of type "metrics" whose data holds step, total_steps, train_loss,
learning_rate, trained_tokens, tokens_per_second and eta_seconds; "Training for N steps" carries
total_steps and start_step. Every other event is printed above the bar as a line.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from cli.views import duration, event_line, queue_text
from client import LlmqClient
from shared.schemas import FineTuningEvent, FineTuningJob


def progress_fields(data: dict[str, Any] | None) -> dict[str, Any]:
    """What an event's data changes on the bar: completed, total, loss, speed, eta (only what it holds)."""
    if not data:
        return {}
    fields: dict[str, Any] = {}
    if isinstance(data.get("total_steps"), int):
        fields["total"] = data["total_steps"]
    step = data.get("step", data.get("start_step"))
    if isinstance(step, int):
        fields["completed"] = step
    if isinstance(data.get("train_loss"), int | float):
        fields["loss"] = f"{data['train_loss']:.4f}"
    if isinstance(data.get("tokens_per_second"), int | float):
        fields["speed"] = f"{data['tokens_per_second']:.0f} tok/s"
    if "eta_seconds" in data:
        eta = data["eta_seconds"]
        fields["eta"] = duration(eta) if isinstance(eta, int | float) else "-"
    return fields


def is_step_progress(event: FineTuningEvent) -> bool:
    """True for the periodic step events the bar shows (so they are not printed as lines too)."""
    return event.type == "metrics" and bool(event.data) and "train_loss" in (event.data or {})


def follow_fine_tune(client: LlmqClient, job_id: str, console: Console, poll_interval: float = 2.0) -> FineTuningJob:
    """Shows the job's progress until it ends; the job as it ended."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[speed]}"),
        TextColumn("ETA {task.fields[eta]}"),
        console=console,
    )
    with progress:
        task = progress.add_task(job_id, total=None, loss="-", speed="- tok/s", eta="-")
        queue = client.get_fine_tuning_job(job_id).queue
        if queue is not None:  # while queued no event comes: say where it stands, and whether anything will run it
            progress.update(task, description=f"{job_id} queued #{queue.position}")
            progress.console.print(f"queued: {queue_text(queue, 'train')}", markup=False, highlight=False)
        for event in client.follow_events(job_id, poll_interval=poll_interval):
            progress.update(task, description=job_id)
            fields = progress_fields(event.data)
            if fields:
                progress.update(task, **fields)
            if not is_step_progress(event):
                progress.console.print(event_line(event), markup=False, highlight=False)
    return client.get_fine_tuning_job(job_id)
