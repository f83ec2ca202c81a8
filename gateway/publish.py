"""Publishing a committed job's message from the event loop: one LPUSH of a Celery task message on the broker's
Redis, on a pooled redis.asyncio client.

The message is what `Celery.send_task(TASKS[kind], args=[job_id], queue=QUEUES[kind])` puts in Redis (Celery's
task protocol 2 in kombu's Redis envelope: JSON, base64 body, priority 0, so the queue's own list), built here
without kombu's producer, its connection pool and its thread hop; tests/test_publish.py compares the two and a
worker runs what this publishes in every end-to-end test. Other brokers (the embedded file broker) publish
through Celery in a worker thread, as before.

A broker that does not answer is logged, not raised: the job's row is committed and stays queued, and the
reaper re-sends its message once the broker is back (shared.celery_app.enqueue_after_commit's rule).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
import uuid

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from shared.celery_app import QUEUES, TASKS, enqueue_after_commit

log = logging.getLogger(__name__)

_REPLY_TO = str(uuid.uuid4())  # Celery's app.oid: one per publishing process
_ORIGIN = f"gen{os.getpid()}@{socket.gethostname()}"


def task_message(kind: str, job_id: str) -> bytes:
    """The kombu/Celery message (JSON) that runs TASKS[kind] on job_id from QUEUES[kind]."""
    task_id = str(uuid.uuid4())
    body = orjson.dumps([[job_id], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    headers: dict[str, object] = {
        "lang": "py",
        "task": TASKS[kind],
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": repr([job_id]),
        "kwargsrepr": "{}",
        "origin": _ORIGIN,
        "ignore_result": None,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    properties: dict[str, object] = {
        "correlation_id": task_id,
        "reply_to": _REPLY_TO,
        "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": QUEUES[kind]},
        "priority": 0,
        "body_encoding": "base64",
        "delivery_tag": str(uuid.uuid4()),
    }
    return orjson.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": properties,
        }
    )


def broker_client(broker_url: str) -> aioredis.Redis | None:
    """A pooled client for a redis:// broker; None for any other broker (published through Celery)."""
    if not broker_url.startswith(("redis://", "unix://")):
        return None
    return aioredis.Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=2)


class Publisher:
    """Pooled publishing: the messages of every submit that commits while an LPUSH is on its way go out
    together in the next one (one LPUSH of many values, in the order they came), so that under load a process
    makes one broker round trip for many jobs; alone, a message goes out at once. Each submit still waits until
    its own message is in the broker before it answers."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._waiting: list[tuple[str, bytes, asyncio.Future[bool]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def publish(self, queue: str, message: bytes) -> bool:
        """True once the message is in the queue; False (logged) when the broker did not take it."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()
        self._waiting.append((queue, message, done))
        if self._sender is None:
            self._sender = loop.create_task(self._send_waiting())
        return await done

    async def _send_waiting(self) -> None:
        batch: list[tuple[str, bytes, asyncio.Future[bool]]] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                sent = await self._push(batch)
                for _, _, done in batch:
                    if not done.done():  # its request may have been cancelled meanwhile
                        done.set_result(sent)
        finally:
            self._sender = None
            for _, _, done in [*batch, *self._waiting]:  # cancelled (shutdown): nobody waits for ever
                if not done.done():
                    done.set_result(False)
            self._waiting = []

    async def _push(self, batch: list[tuple[str, bytes, asyncio.Future[bool]]]) -> bool:
        queues: dict[str, list[bytes]] = {}
        for queue, message, _ in batch:
            queues.setdefault(queue, []).append(message)
        try:
            for queue, messages in queues.items():
                await self.client.lpush(queue, *messages)
            return True
        except (RedisError, OSError) as exc:
            log.warning("could not publish %d jobs (queued; the reaper will re-send them): %s", len(batch), exc)
            return False


async def publish(client: Publisher | None, kind: str, job_id: str) -> bool:
    """Publishes a committed job's message; False (logged) when the broker did not take it."""
    if client is None:
        return await run_in_threadpool(enqueue_after_commit, kind, job_id)
    return await client.publish(QUEUES[kind], task_message(kind, job_id))
