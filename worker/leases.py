"""Heartbeats: a background thread renews the leases of the jobs this process is running.

A thread keeps renewing while the main thread sits in a long forward pass (torch releases the GIL),
so a lease expires only when the process is gone or stuck.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache

from shared import job_states
from shared.db import get_sessionmaker
from shared.job_states import Claim

log = logging.getLogger(__name__)


@lru_cache
def lease_keeper(lease_seconds: float) -> LeaseKeeper:
    """This process's lease keeper (one heartbeat thread for every job the process runs)."""
    return LeaseKeeper(lease_seconds)


class LeaseKeeper:
    """Renews, every third of a lease, the lease of every claim it holds."""

    def __init__(self, lease_seconds: float) -> None:
        self.lease_seconds = lease_seconds
        self._claims: dict[str, Claim] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.lost: set[str] = set()  # ids of jobs whose claim another attempt took over

    @contextmanager
    def holding(self, claims: Sequence[Claim]) -> Iterator[None]:
        """Keeps these claims' leases alive for the duration of the block."""
        self.hold(claims)
        try:
            yield
        finally:
            self.release(claims)

    def hold(self, claims: Sequence[Claim]) -> None:
        """Starts renewing these claims' leases (until release)."""
        with self._lock:
            self._claims.update({c.job_id: c for c in claims})
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
                self._thread.start()

    def release(self, claims: Sequence[Claim]) -> None:
        """Stops renewing these claims' leases (their jobs are written back, or given up)."""
        with self._lock:
            for c in claims:
                self._claims.pop(c.job_id, None)
                self.lost.discard(c.job_id)

    def job_ids(self) -> list[str]:
        """The jobs this process runs now (what its worker heartbeat reports)."""
        with self._lock:
            return sorted(self._claims)

    def _run(self) -> None:
        while True:
            threading.Event().wait(self.lease_seconds / 3)
            with self._lock:
                claims = list(self._claims.values())
            if not claims:
                continue
            try:
                with get_sessionmaker()() as session:  # one statement for every claim (a batch holds dozens)
                    self.lost |= job_states.renew_leases(session, claims, self.lease_seconds)
            except Exception:
                log.exception("lease renewal failed; retrying")
