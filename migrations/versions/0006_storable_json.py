"""Rows every reader can read: repair stored NUL, lone surrogates and NaN, then jsonb on Postgres.

Before 0006 a request could store text that no reader could use: a lone UTF-16 surrogate (kept as the escape
\\udXXX in a json column; answering it fails UTF-8 encoding), a NUL (\\u0000 in a json column; Postgres's
->> and #>> refuse to read the whole value, which broke /metrics), or, on SQLite, NaN from a worker. This
replaces each of them with U+FFFD (NaN and infinities with null), as shared.storable does for every write
from now on, and on SQLite also NUL in the text columns a request or a worker message could fill.

On Postgres the JSON columns then become jsonb, which refuses such values outright. The type change rewrites
each table under an exclusive lock: on a large database, run it in a quiet moment.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# table -> JSON columns (each table's key is `id`)
JSON_COLUMNS = {
    "jobs": ("params", "result", "error"),
    "job_events": ("data",),
    "checkpoints": ("metrics",),
    "fine_tuned_models": ("manifest",),
}
# Text columns that a request or a worker's message could fill; only SQLite can hold a NUL in them.
TEXT_COLUMNS = {"jobs": ("model",), "files": ("filename",), "job_events": ("message",)}

# How Python's json.dumps wrote the values to repair: NUL and lone surrogates as escapes, NaN as a bare word.
NEEDLES = ("\\u0000", *(f"\\ud{digit}" for digit in "89abcdef"), "NaN", "Infinity")
REPLACEMENT = "\ufffd"
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


# A copy of shared.storable.scrub_json as of this revision (a migration must not change when the code does).
def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return _UNSTORABLE.sub(REPLACEMENT, value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {_scrub(key): _scrub(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_scrub(item) for item in value]
    return value


def _repair_json(bind: sa.Connection, table: str, column: str) -> None:
    postgres = bind.dialect.name == "postgresql"
    find = "strpos(CAST({c} AS TEXT), :n{i}) > 0" if postgres else "instr({c}, :n{i}) > 0"
    condition = " OR ".join(find.format(c=column, i=i) for i in range(len(NEEDLES)))
    needles = {f"n{i}": needle for i, needle in enumerate(NEEDLES)}
    rows = bind.execute(sa.text(f"SELECT id, CAST({column} AS TEXT) FROM {table} WHERE {condition}"), needles)
    store = f"UPDATE {table} SET {column} = {'CAST(:value AS json)' if postgres else ':value'} WHERE id = :id"
    for key, stored in rows.all():
        value = json.loads(stored)
        repaired = _scrub(value)
        if json.dumps(repaired) != json.dumps(value, allow_nan=True):
            bind.execute(sa.text(store), {"id": key, "value": json.dumps(repaired, allow_nan=False)})


def _repair_text(bind: sa.Connection, table: str, column: str) -> None:
    # SQLite's text functions stop at a NUL; its blob functions do not.
    found = f"SELECT id, {column} FROM {table} WHERE instr(CAST({column} AS BLOB), x'00') > 0"
    for key, text in bind.execute(sa.text(found)).all():
        bind.execute(
            sa.text(f"UPDATE {table} SET {column} = :value WHERE id = :id"),
            {"id": key, "value": _UNSTORABLE.sub(REPLACEMENT, text)},
        )


def upgrade() -> None:
    bind = op.get_bind()
    for table, columns in JSON_COLUMNS.items():
        for column in columns:
            _repair_json(bind, table, column)
    if bind.dialect.name == "sqlite":
        for table, columns in TEXT_COLUMNS.items():
            for column in columns:
                _repair_text(bind, table, column)
    if bind.dialect.name == "postgresql":
        for table, columns in JSON_COLUMNS.items():
            for column in columns:
                op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} TYPE jsonb USING {column}::jsonb")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table, columns in JSON_COLUMNS.items():
            for column in columns:
                op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} TYPE json USING {column}::json")
