"""Alembic environment: migrates the database named by llmq's settings (or a URL given in code)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from shared.db import get_engine, make_engine
from shared.models import Base

config = context.config
target_metadata = Base.metadata


def run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


url = config.attributes.get("database_url")
engine = make_engine(url) if url else get_engine()
connection = config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    with engine.connect() as conn:
        run(conn)
