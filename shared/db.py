"""Database engine and sessions, built once per process from the settings."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import DisconnectionError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from shared import storable
from shared.settings import get_settings


def make_engine(url: str) -> Engine:
    """An engine for url; SQLite gets WAL and a busy timeout so several processes can write. JSON columns are
    written through shared.storable.dumps on every database."""
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"timeout": 30, "check_same_thread": False}, json_serializer=storable.dumps
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    engine = create_engine(
        url,
        # No fewer pooled connections than the gateway's worker threads (anyio runs blocking handlers on up to
        # 40): with fewer, every request past the pool opens and closes a Postgres connection (a backend fork).
        pool_size=40,
        max_overflow=10,
        pool_use_lifo=True,  # the same few connections stay hot; the rest idle, and are pinged before reuse
        json_serializer=storable.dumps,  # no NUL, lone surrogate or NaN reaches a JSON column
    )
    _ping_when_idle(engine)
    return engine


IDLE_PING_SECONDS = 2.0


def _ping_when_idle(engine: Engine) -> None:
    """Pings a pooled connection before reuse when it has been idle, instead of on every checkout
    (pool_pre_ping: one more round trip per request). A connection in steady use that the server dropped
    fails its request (503) and SQLAlchemy then replaces every pooled connection."""

    @event.listens_for(engine, "connect")
    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info["checked_in"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if time.monotonic() - record.info.get("checked_in", 0.0) < IDLE_PING_SECONDS:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as exc:
            raise DisconnectionError from exc  # the pool discards it and checks out another (or connects)


@lru_cache
def get_engine() -> Engine:
    """The process-wide engine for the configured database."""
    settings = get_settings()
    if settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    return make_engine(settings.resolved_database_url)


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    """The process-wide session factory."""
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


def get_read_sessionmaker() -> sessionmaker[Session]:
    """Sessions for reads that need no transaction: autocommit, so one read is one round trip (no BEGIN and
    ROLLBACK around it). Same engine and pool as get_sessionmaker."""
    return _read_sessionmaker(get_engine())


@lru_cache(maxsize=1)
def _read_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def ping(engine: Engine) -> None:
    """Runs `SELECT 1`; raises when the database does not answer."""
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))


def answers(engine: Engine) -> bool:
    """Whether the database answers now."""
    try:
        ping(engine)
        return True
    except OperationalError:
        return False


def wait_until_reachable(engine: Engine, max_interval: float = 5.0) -> float:
    """Blocks until the database answers, retrying with a growing interval (at most max_interval
    seconds); the seconds it waited."""
    started, interval = time.monotonic(), 0.25
    while not answers(engine):
        time.sleep(interval)
        interval = min(interval * 2, max_interval)
    return time.monotonic() - started
