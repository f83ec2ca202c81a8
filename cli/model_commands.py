"""The `llmq` commands that take models in and out: download result files, pause and resume a fine-tune,
delete a fine-tuned model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.api_commands import JobIdArgument, connect

FileIdArgument = Annotated[str, typer.Argument(help="A file id (file-...): an upload or a result file.")]


def download(
    ctx: typer.Context,
    file_id: FileIdArgument,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Where to write it (default: the file's name, here).")
    ] = None,
) -> None:
    """Download a file: a fine-tune's result files (adapter archive, metrics CSV) or an upload."""
    client = connect(ctx)
    target = output or Path(client.get_file(file_id).filename).name
    written = client.download_file(file_id, target)
    typer.echo(str(written))


def pause(ctx: typer.Context, job_id: JobIdArgument) -> None:
    """Pause a fine-tune: it checkpoints after its current step and frees its worker (resume continues it)."""
    job = connect(ctx).pause_fine_tuning_job(job_id)
    how = "" if job.status == "paused" else ": pause requested (checkpoints after this step)"
    typer.echo(f"{job.id} {job.status}{how}")


def resume(ctx: typer.Context, job_id: JobIdArgument) -> None:
    """Resume a paused fine-tune from its checkpoint, on any train worker."""
    job = connect(ctx).resume_fine_tuning_job(job_id)
    typer.echo(f"{job.id} {job.status}")


def delete_model(
    ctx: typer.Context, model: Annotated[str, typer.Argument(help="A fine-tuned model id (ft:...).")]
) -> None:
    """Delete one of your fine-tuned models: no longer listed or served, its adapter removed."""
    deleted = connect(ctx).delete_model(model)
    typer.echo(f"{deleted.id} deleted")
