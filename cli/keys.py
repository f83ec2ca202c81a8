"""`llmq keys create|list|revoke`: API keys, written straight to the database (run where LLMQ_DATABASE_URL points)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cli.exit_codes import CliError
from cli.views import local_time
from shared import api_keys
from shared.db import get_sessionmaker
from shared.models import DEFAULT_TENANT

app = typer.Typer(help="Create, list and revoke API keys (where the database is).", add_completion=False)


@app.command()
def create(
    tenant: Annotated[str, typer.Option(help="Whose key: jobs, files and models are kept apart per tenant.")] = (
        DEFAULT_TENANT
    ),
    name: Annotated[str, typer.Option(help="A label to recognise the key by.")] = "",
) -> None:
    """Create an API key; prints the token (its only copy) on stdout."""
    with get_sessionmaker()() as session:
        key = api_keys.create_key(session, tenant, name)
    typer.echo(f"key {key.key_id} for tenant {key.tenant}; the token below is shown only this once", err=True)
    typer.echo(key.token)


@app.command("list")
def list_keys() -> None:
    """List API keys (ids, tenants, names; never secrets)."""
    with get_sessionmaker()() as session:
        keys = api_keys.list_keys(session)
    table = Table(box=None, pad_edge=False)
    for column in ("ID", "TENANT", "NAME", "CREATED", "REVOKED"):
        table.add_column(column, no_wrap=column in ("ID", "CREATED", "REVOKED"))
    for key in keys:
        table.add_row(key.id, Text(key.tenant), Text(key.name), local_time(key.created_at), local_time(key.revoked_at))
    Console(soft_wrap=True).print(table)


@app.command()
def revoke(key_id: Annotated[str, typer.Argument(help="The key's id (the part after llmq- in the token).")]) -> None:
    """Revoke an API key at once."""
    with get_sessionmaker()() as session:
        revoked = api_keys.revoke_key(session, key_id)
    if not revoked:
        raise CliError(f"no live API key {key_id!r}")
    typer.echo(f"{key_id} revoked")
