"""`python -m worker.healthcheck`: exit 0 while a worker on this host keeps its heartbeat fresh (compose's
healthcheck). It proves the worker process beats and reaches the database; a stuck or dead worker turns it
unhealthy within worker_stale_seconds. Light: it imports neither torch nor Celery."""

from __future__ import annotations

import socket
import sys

from shared import workers
from shared.db import get_sessionmaker
from shared.settings import get_settings


def main() -> int:
    settings = get_settings()
    host = socket.gethostname()
    with get_sessionmaker()() as session:
        mine = [w for w in workers.listed(session) if w.host == host]
    live = [w for w in mine if workers.is_live(w, settings.worker_stale_seconds)]
    if not live:
        print(f"no live worker on {host} (registered: {[w.id for w in mine]})", file=sys.stderr)
        return 1
    print(" ".join(f"{w.id} {w.kind} live, jobs {w.current_jobs.get('ids', [])}" for w in live))
    return 0


if __name__ == "__main__":
    sys.exit(main())
