"""Each tenant's count of active jobs (queued or running, outside a batch), kept by Postgres for the quota.

A trigger on jobs (migration 0012) appends +1 / -1 to tenant_active_changes whenever a job starts or stops being
active; a fold moves a tenant's changes into its row of tenant_active_jobs, always under the tenant's advisory
lock, the same lock a submit holds while it checks the quota and inserts. The gateway's submit folds the tenant it
submits for (gateway/pg.py); the reaper folds every tenant whose changes piled up (a tenant that submits only
through routes that count, or a gateway without a quota, would otherwise leave its changes unfolded for ever).
"""

from __future__ import annotations

import hashlib

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

# Folds a tenant's changes into its count and gives the count (the change rows a concurrent transaction has
# not committed stay, and are folded later: until then their job still counts as it did).
FOLD = """
WITH folded AS (DELETE FROM tenant_active_changes WHERE tenant = {tenant} RETURNING delta)
INSERT INTO tenant_active_jobs AS t (tenant, active) SELECT {tenant}, coalesce(sum(delta), 0) FROM folded
ON CONFLICT (tenant) DO UPDATE SET active = t.active + excluded.active
RETURNING t.active"""

PILED_UP = 1000  # unfolded changes of one tenant above which the reaper folds them


def tenant_lock_key(tenant: str) -> int:
    """The advisory lock of a tenant's quota: submits, and folds of its count, hold it."""
    digest = hashlib.blake2b(f"llmq-quota:{tenant}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def lock_tenant(session: Session, tenant: str) -> None:
    """Takes the tenant's advisory lock until the session's transaction ends (Postgres only)."""
    session.execute(select(func.pg_advisory_xact_lock(tenant_lock_key(tenant))))


def fold_piled_up(session: Session, at_least: int = PILED_UP) -> dict[str, int]:
    """Folds the changes of every tenant with at least this many unfolded, each in its own transaction under its
    lock (never two tenants' locks at once: no wait cycle with a submit that holds several); the counts it left.
    Does nothing on a database other than Postgres."""
    if session.get_bind().dialect.name != "postgresql":
        return {}
    query = text("SELECT tenant FROM tenant_active_changes GROUP BY tenant HAVING count(*) >= :n ORDER BY tenant")
    tenants = list(session.scalars(query, {"n": at_least}))
    session.rollback()
    folded = {}
    for tenant in tenants:
        lock_tenant(session, tenant)
        folded[tenant] = int(session.scalar(text(FOLD.format(tenant=":tenant")), {"tenant": tenant}))
        session.commit()
    return folded
