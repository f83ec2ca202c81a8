"""The id a worker process claims jobs under: host:pid, as the job row's `worker` column and the logs show it.

Read per call, never once at import: Celery imports the task modules in its main process and a prefork pool
forks the processes that run tasks after that, so an id taken at import would name the parent in every child.
(The workers run with the solo pool today, where both agree; this stays right under any pool.)
"""

from __future__ import annotations

import os
import socket


def worker_id() -> str:
    """host:pid of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"
