"""The worker's Celery app (`celery -A worker.app worker -Q generate|train`) and its process-wide setup.

Celery imports the task module (worker/tasks.py) itself when a worker starts, named in `include`: neither
module imports the other.
"""

from __future__ import annotations

import logging
from contextvars import Token

from celery.signals import (
    setup_logging,
    task_postrun,
    task_prerun,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)

from shared.celery_app import TASKS, get_celery
from shared.logging import bind_job, configure_logging, unbind_job
from shared.settings import get_settings
from worker import drain, health, metrics
from worker.process_model import generate_models

app = get_celery()
app.conf.include = ["worker.tasks"]  # imported by each worker at start, after this module
log = logging.getLogger(__name__)


def limit_torch_threads(threads: int) -> None:
    """Caps torch's intra-op CPU threads in this process (0 leaves torch's default, one per core)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


limit_torch_threads(get_settings().torch_threads)


@setup_logging.connect
def _logging(loglevel: int | str | None = None, **_kwargs: object) -> None:
    # Connected, this replaces Celery's own logging setup: the worker logs like the gateway (LLMQ_LOG_FORMAT).
    configure_logging(get_settings().log_format, loglevel or logging.INFO)


_bound: dict[str, Token[tuple[str, ...]]] = {}  # task id -> what to reset when it ends


@task_prerun.connect
def _bind_job(task_id: str, task: object, args: tuple[object, ...] = (), **_kwargs: object) -> None:
    # A fine-tune (or export) task is one job: every line it logs carries the job id. (A generate task serves a batch,
    # whichever jobs are waiting; worker/serving.py names the batch's jobs on its lines instead.)
    if getattr(task, "name", None) in (TASKS["train"], TASKS["export"]) and args:
        _bound[task_id] = bind_job(str(args[0]))


@task_postrun.connect
def _unbind_job(task_id: str, **_kwargs: object) -> None:
    token = _bound.pop(task_id, None)
    if token is not None:
        unbind_job(token)


def _adapter_stats() -> list[tuple[str, int]]:
    adapters = generate_models().loaded_adapters()
    if adapters is None:
        return []
    disk = adapters.disk.stats
    return [("hits", disk.hits), ("misses", disk.misses), ("evicted", disk.evicted),
            ("loads", adapters.loads), ("unloads", adapters.unloads)]  # fmt: skip


def _kind() -> str:
    return "generate" if "generate" in (app.amqp.queues.consume_from or {}) else "train"


@worker_ready.connect
def _serve_metrics_and_beat(**_kwargs: object) -> None:
    settings = get_settings()
    generates = _kind() == "generate"
    metrics.serve(settings.worker_metrics_port, settings.worker_metrics_host, _adapter_stats if generates else None)
    if generates:
        from worker.scheduler import step_hooks

        step_hooks.append(metrics.on_step)
    health.start(settings, _kind())


@worker_shutting_down.connect
def _drain(**_kwargs: object) -> None:
    # Sent from Celery's SIGTERM/SIGINT handler (warm shutdown): the running task finishes or hands back its job.
    drain.request(get_settings().drain_seconds)
    # Under steady load a continuous batch never empties: on a warm shutdown it stops claiming, finishes the
    # rows in flight and returns, so the shutdown waits for those rows only.
    from worker.scheduler import stop_claiming

    stop_claiming.set()
    beat = health.current()
    if beat is not None:
        beat.draining = True


@worker_shutdown.connect
def _deregister(**_kwargs: object) -> None:
    beat = health.current()
    if beat is not None:
        beat.stop()


@worker_ready.connect
def _preload(**_kwargs: object) -> None:
    # A generate worker loads its model before the first job, so that job does not pay for it.
    if "generate" in (app.amqp.queues.consume_from or {}):
        try:
            generate_models().get()
        except Exception:
            log.exception("base model failed to load; generation jobs will fail until it loads")
