"""Graceful drain: what a worker does after SIGTERM (or the first Ctrl-C).

- It claims nothing new (`requested()` is the one check, in worker/tasks.py).
- A generate worker finishes the batch it decodes, writes it back and exits (Celery's warm shutdown waits for
  the running task).
- A train worker stops its fine-tune at the current step with a checkpoint (worker/progress_callback.py,
  `stop_with_checkpoint`), hands the job back to the queue at once (shared/job_states.py `hand_back`: no lease
  to wait out, no attempt spent) and exits; another worker resumes from that checkpoint.
- Whatever happens, the process exits within `drain_seconds` of the signal (a watchdog ends it then; the
  lease and the reaper recover a job cut short that way).
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

_requested = threading.Event()


def requested() -> bool:
    """True once this worker was asked to stop: claim nothing new, finish or hand back what runs."""
    return _requested.is_set()


def request(deadline_seconds: float) -> None:
    """Starts the drain (idempotent): the flag, and a watchdog that ends the process after deadline_seconds."""
    if _requested.is_set():
        return
    _requested.set()
    log.warning("draining: no new work; finishing or handing back the current job (exit within %.0f s)",
                deadline_seconds)  # fmt: skip
    watchdog = threading.Timer(deadline_seconds, _give_up, args=(deadline_seconds,))
    watchdog.daemon = True
    watchdog.start()


def _give_up(deadline_seconds: float) -> None:
    log.error("drain did not finish within %.0f s; exiting now (the lease hands the job on)", deadline_seconds)
    logging.shutdown()
    os._exit(1)
