"""Celery tasks: thin wrappers that hand a job id to the runtime. The message carries only the id."""

from __future__ import annotations

from shared.settings import get_settings
from worker.app import app, generate_models
from worker.serving import serve_waiting_jobs


@app.task(name="llmq.generate", ignore_result=True)
def generate(job_id: str) -> None:
    """Serves waiting generation jobs, this one among them unless another worker already took it.

    A message whose job is no longer queued finds nothing to claim and does nothing.
    """
    serve_waiting_jobs(get_settings(), generate_models())


@app.task(name="llmq.train", ignore_result=True)
def train(job_id: str) -> None:
    """Runs the fine-tuning job to a terminal state; a message for a job no longer queued does nothing."""
    # The training stack (TRL, the Trainer) costs seconds to import; generate workers never pay for it.
    from worker.training import run_fine_tune

    run_fine_tune(job_id, get_settings())
