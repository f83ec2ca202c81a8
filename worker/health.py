"""This worker process's registration and heartbeat (shared/workers.py), and its drain flag.

A thread records every `worker_heartbeat_seconds` that the process is alive, which queue it consumes, its base
model and the jobs it runs now. SIGTERM sets `draining` (worker/drain.py): the heartbeat says so, and the
process claims nothing new.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from shared import workers
from shared.db import get_sessionmaker
from shared.settings import Settings
from worker.identity import worker_id
from worker.leases import lease_keeper

log = logging.getLogger(__name__)


class Heartbeat:
    """Registers this process, then keeps its row fresh from a daemon thread until stopped."""

    def __init__(self, settings: Settings, kind: str) -> None:
        self.settings = settings
        self.kind = kind
        self.draining = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        beat = workers.Beat(
            id=worker_id(),
            kind=self.kind,
            host=socket.gethostname(),
            pid=os.getpid(),
            model=self.settings.base_model,
            jobs=lease_keeper(self.settings.lease_seconds).job_ids(),
            draining=self.draining,
        )
        with get_sessionmaker()() as session:
            workers.heartbeat(session, beat)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="worker-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
            except Exception as exc:  # the database may be down; the next beat tries again
                log.warning("worker heartbeat failed: %s", exc)
            self._stop.wait(self.settings.worker_heartbeat_seconds)

    def stop(self) -> None:
        """Stops beating and removes this worker's row (a clean exit is not a dead worker)."""
        self._stop.set()
        try:
            with get_sessionmaker()() as session:
                workers.deregister(session, worker_id())
        except Exception as exc:
            log.warning("could not deregister this worker: %s", exc)


_current: Heartbeat | None = None


def start(settings: Settings, kind: str) -> Heartbeat:
    """Starts this process's heartbeat (once)."""
    global _current
    if _current is None:
        _current = Heartbeat(settings, kind)
        _current.start()
    return _current


def current() -> Heartbeat | None:
    return _current
