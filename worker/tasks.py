"""Celery tasks: thin wrappers that hand a job id to the runtime. The message carries only the id."""

from __future__ import annotations

import logging

from sqlalchemy.exc import OperationalError

from shared.celery_app import enqueue, get_celery
from shared.db import answers, get_engine, wait_until_reachable
from shared.settings import get_settings
from worker import drain
from worker.process_model import generate_models
from worker.serving import serve_waiting_jobs

app = get_celery()  # the app worker.app configures (one per process); it imports this module by `include`
log = logging.getLogger(__name__)


@app.task(name="llmq.generate", ignore_result=True)
def generate(job_id: str) -> None:
    """Serves waiting generation jobs, this one among them unless another worker already took it.

    A message whose job is no longer queued finds nothing to claim and does nothing. While the database
    is unreachable the task waits for it, holding its message (acknowledged only after the task), so an
    outage does not spend the queue's messages one failed task after another.
    """
    if drain.requested():
        # Stop claiming new work; finish what's in flight. The message goes back for another worker.
        enqueue("generate", job_id)
        return
    while True:
        try:
            serve_waiting_jobs(get_settings(), generate_models())
            return
        except OperationalError as exc:
            if answers(get_engine()):
                raise  # not an outage: the task fails as any other error would
            log.warning("database unreachable (%s); waiting for it before serving", str(exc).splitlines()[0])
            waited = wait_until_reachable(get_engine())
            log.info("database reachable again after %.1f s", waited)


@app.task(name="llmq.train", ignore_result=True)
def train(job_id: str) -> None:
    """Runs the fine-tuning job to a terminal state; a message for a job no longer queued does nothing."""
    # The training stack (TRL, the Trainer) costs seconds to import; generate workers never pay for it.
    from worker.fine_tune import run_fine_tune

    if drain.requested():  # stopping: the job stays queued for another worker
        enqueue("train", job_id)
        return

    run_fine_tune(job_id, get_settings())


@app.task(name="llmq.export", ignore_result=True)
def export(job_id: str) -> None:
    """Runs the export job (on the train queue) to a terminal state; a message for a job no longer queued does
    nothing."""
    from worker.export import run_export

    if drain.requested():  # stopping: the export stays queued for another worker
        enqueue("export", job_id)
        return

    run_export(job_id, get_settings())
