"""The worker's Celery app (`celery -A worker.app worker -Q generate|train`): registers the tasks."""

from __future__ import annotations

import logging
from functools import lru_cache

from celery.signals import worker_ready

from shared.celery_app import get_celery
from shared.settings import get_settings
from worker.serving import ModelHolder

app = get_celery()
log = logging.getLogger(__name__)


@lru_cache
def generate_models() -> ModelHolder:
    """This process's base model holder (the model itself loads on first use)."""
    return ModelHolder(get_settings())


@worker_ready.connect
def _preload(**_kwargs: object) -> None:
    # A generate worker loads its model before the first job, so that job does not pay for it.
    if "generate" in (app.amqp.queues.consume_from or {}):
        try:
            generate_models().get()
        except Exception:
            log.exception("base model failed to load; generation jobs will fail until it loads")


import worker.tasks  # noqa: E402,F401  (registers the tasks on app)
