"""API keys: created and revoked from the command line, stored only as hashes, checked in constant time.

A key reads `llmq-<key id>-<secret>`. The id finds the row; the secret's SHA-256 is compared with
hmac.compare_digest. Secrets are 32 random bytes, so a fast hash is enough (no password stretching).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared.models import ApiKey, utcnow

PREFIX = "llmq"
# Compared against when the key id is unknown, so that path costs the same as a wrong secret.
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()


@dataclass(frozen=True)
class NewKey:
    key_id: str
    tenant: str
    token: str  # shown once, never stored


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(session: Session, tenant: str, name: str = "") -> NewKey:
    """A new key for tenant, committed; the returned token is the only copy of its secret."""
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    session.add(ApiKey(id=key_id, tenant=tenant, name=name, secret_sha256=_hash(secret), created_at=utcnow()))
    session.commit()
    return NewKey(key_id=key_id, tenant=tenant, token=f"{PREFIX}-{key_id}-{secret}")


def revoke_key(session: Session, key_id: str) -> bool:
    """Revokes a key and commits; False when there is no such live key."""
    done = session.execute(
        update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
    )
    session.commit()
    return bool(done.rowcount == 1)  # type: ignore[attr-defined]


def list_keys(session: Session) -> list[ApiKey]:
    """Every key, oldest first (hashes only)."""
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))


def authenticate(session: Session, token: str) -> tuple[str, str] | None:
    """(tenant, key id) of a valid, live key; None for anything else."""
    prefix, _, rest = token.partition("-")
    key_id, _, secret = rest.partition("-")
    row = session.get(ApiKey, key_id) if prefix == PREFIX and key_id and secret else None
    expected = row.secret_sha256 if row is not None else _DUMMY_HASH
    matches = hmac.compare_digest(expected, _hash(secret))
    if row is None or not matches or row.revoked_at is not None:
        return None
    return row.tenant, row.id
