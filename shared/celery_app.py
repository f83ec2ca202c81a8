"""The one Celery app: JSON messages carrying only a job id, one task per job kind; exports share the train queue
(a train worker runs them: they load the full base model and take minutes on big ones).

The gateway publishes by task name (it never imports worker code); worker.app names worker.tasks in `include`,
which Celery imports when a worker starts.
"""

from __future__ import annotations

import logging
from functools import lru_cache

from celery import Celery

from shared import file_broker
from shared.settings import Settings, get_settings

log = logging.getLogger(__name__)

QUEUES = {"generate": "generate", "train": "train", "export": "train"}
TASKS = {"generate": "llmq.generate", "train": "llmq.train", "export": "llmq.export"}


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured from settings."""
    file_broker.register()
    app = Celery("llmq", broker=settings.resolved_broker_url, set_as_current=False)
    transport_options: dict[str, object] = {
        "visibility_timeout": settings.broker_visibility_timeout,
        # A broker that is down fails a publish in seconds, not minutes (the reaper re-sends later).
        "socket_connect_timeout": 2,
        "socket_timeout": 5,
    }
    if settings.broker_url is None:
        folder = settings.broker_dir
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        transport_options = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "polling_interval": settings.broker_polling_interval,
        }
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],  # a pickle message is rejected, never unpickled
        result_serializer="json",
        task_ignore_result=True,  # results live in the job row, not in a Celery backend
        task_acks_late=True,  # a message is acknowledged after its task, so a crash redelivers it
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # a waiting message stays in the broker for idle workers
        task_routes={name: {"queue": QUEUES[kind]} for kind, name in TASKS.items()},
        task_default_queue=QUEUES["generate"],
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
        worker_hijack_root_logger=False,
        worker_enable_remote_control=settings.broker_url is not None,
        worker_send_task_events=False,
    )
    return app


@lru_cache
def get_celery() -> Celery:
    """The process-wide Celery app for the configured broker."""
    return make_celery(get_settings())


def enqueue(kind: str, job_id: str) -> None:
    """Publishes the message for a committed job: its id, nothing else."""
    get_celery().send_task(TASKS[kind], args=[job_id], queue=QUEUES[kind])


def enqueue_after_commit(kind: str, job_id: str) -> bool:
    """enqueue, for a job whose row is already committed: a broker failure is logged, not raised.

    The job exists and stays queued; the reaper re-sends its message once the broker is back. Raising
    here would tell the client the job failed, and a client that retries would get it twice.
    """
    try:
        enqueue(kind, job_id)
        return True
    except Exception as exc:
        log.warning("could not publish %s (queued; the reaper will re-send it): %s", job_id, exc)
        return False


def waiting_messages(kind: str) -> int:
    """Messages waiting in the broker in a kind's queue, not yet taken by a worker.

    kombu counts them: on Redis the LLEN of the queue's list and of its priority sub-lists
    (`generate`, `generate\\x06\\x163`, ...); on the file broker the queue's message files (a taken
    message is moved out first). A message a worker holds unacknowledged is not counted.
    """
    with get_celery().pool.acquire(block=True, timeout=5) as connection:
        declared = connection.default_channel.queue_declare(QUEUES[kind], passive=False)
        return int(declared.message_count)
