"""Request dependencies: the settings and a database session.

Both are async on purpose: FastAPI runs a plain `def` dependency in a worker thread, and that hop (a thread
hand-off each way) cost more than the work itself on every request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from shared.db import get_sessionmaker
from shared.settings import Settings, get_settings


async def get_db() -> AsyncIterator[Session]:
    """A session for one request, closed afterwards.

    Creating a session does no I/O (it checks a connection out at its first query, in the handler's thread),
    so this runs on the event loop; only closing a session that still holds a connection (a rollback and the
    return to the pool) goes to a worker thread.
    """
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


async def current_settings() -> Settings:
    """The process-wide settings."""
    return get_settings()


SessionDep = Annotated[Session, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(current_settings)]
