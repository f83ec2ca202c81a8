"""`llmq batch FILE`: submits a JSONL of requests as an OpenAI batch and follows it with a progress bar."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cli.api_commands import connect
from cli.exit_codes import FAILED, INTERRUPTED, CliError
from client import LlmqClient
from shared.batch_schemas import BatchObject, BatchStatus

ENDED = (BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.CANCELLED, BatchStatus.EXPIRED)
POLL_SECONDS = 0.5


def batch(
    ctx: typer.Context,
    file: Annotated[
        Path,
        typer.Argument(
            exists=True, dir_okay=False, readable=True, help='JSONL of {"custom_id", "method", "url", "body"} lines.'
        ),
    ],
    endpoint: Annotated[str, typer.Option(help="/v1/completions or /v1/chat/completions")] = "/v1/completions",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Where to write the answers (JSONL).")] = None,
    errors: Annotated[Path | None, typer.Option(help="Where to write the error lines (JSONL).")] = None,
) -> None:
    """Run a file of requests as a batch, below interactive jobs; bad lines are reported with their numbers."""
    client = connect(ctx)
    uploaded = client.upload_file(file, purpose="batch")
    created = client.create_batch(uploaded.id, endpoint=endpoint)
    console = Console(stderr=True)
    console.print(f"{created.id}: {created.request_counts.total} requests")
    try:
        ended = follow_batch(client, created, console)
    except KeyboardInterrupt:
        raise CliError(f"stopped following {created.id}; it goes on running", INTERRUPTED) from None
    counts = ended.request_counts
    typer.echo(f"{ended.id} {ended.status}: {counts.completed} completed, {counts.failed} failed")
    for file_id, target in ((ended.output_file_id, output), (ended.error_file_id, errors)):
        if file_id is not None and target is not None:
            client.download_file(file_id, target)
            typer.echo(f"{file_id} -> {target}")
    if ended.status != BatchStatus.COMPLETED:
        raise CliError(f"{ended.id} {ended.status}", FAILED)


def follow_batch(client: LlmqClient, batch: BatchObject, console: Console) -> BatchObject:
    """Polls the batch until it ends, showing answered requests against the total; the ended batch."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(str(batch.status), total=batch.request_counts.total)
        while batch.status not in ENDED:
            time.sleep(POLL_SECONDS)
            batch = client.get_batch(batch.id)
            done = batch.request_counts.completed + batch.request_counts.failed
            progress.update(task, completed=done, description=str(batch.status))
    return batch
