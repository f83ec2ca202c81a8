"""The ORM models and the migrations describe the same schema: Alembic's autogenerate, run against a database
migrated to head, finds nothing to change (tables, columns, types such as the jsonb columns of migration 0006,
nullability, server defaults, indexes). A model changed without a migration, or a migration the models do not
follow, fails here. Real Postgres and SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from shared.db import make_engine
from shared.migrate import upgrade
from shared.models import Base


def schema_differences(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"compare_type": True, "compare_server_default": True}
            )
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


@pytest.mark.parametrize("engine", ["postgres", "sqlite"])
def test_models_and_migrations_describe_the_same_schema(
    engine: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if engine == "postgres":
        url = request.getfixturevalue("postgres_url")  # migrated to head by the fixture
    else:
        url = f"sqlite:///{tmp_path / 'schema.db'}"
        upgrade(url)
    assert schema_differences(url) == []
