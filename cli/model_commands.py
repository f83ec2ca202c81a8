"""The `llmq` commands that take models in and out: download result files, export a standalone model, pause
and resume a fine-tune, delete a fine-tuned model."""

from __future__ import annotations

import tarfile
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from cli.api_commands import JobIdArgument, connect, err
from cli.exit_codes import FAILED, INTERRUPTED, CliError

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


class Dtype(StrEnum):
    float16 = "float16"
    float32 = "float32"


def export(
    ctx: typer.Context,
    job_id: JobIdArgument,
    dtype: Annotated[Dtype, typer.Option(help="Weights of the exported model.")] = Dtype.float16,
    checkpoint: Annotated[
        str | None, typer.Option(help="Export this checkpoint of the job (ft:...:ckpt-step-<n>) instead.")
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Unpack the model into this folder (default: <job-id>-<dtype>); waits."),
    ] = None,
    follow: Annotated[bool, typer.Option("--follow", help="Wait for the export, then download and unpack it.")] = False,
) -> None:
    """Export a fine-tune as a standalone Hugging Face model (adapter merged into the unquantized base)."""
    client = connect(ctx)
    created = client.export_fine_tuning_job(job_id, dtype=dtype.value, checkpoint=checkpoint)
    if not follow and output is None:
        typer.echo(f"{created.id}  {created.status}")
        err.print(f"download it once done with: llmq export {job_id} --follow", markup=False, highlight=False)
        return
    err.print(f"{created.id} {created.status}; waiting for it (Ctrl-C stops waiting, not the export)", markup=False)
    try:
        done = client.wait_export(job_id, created.id)
    except KeyboardInterrupt:
        raise typer.Exit(INTERRUPTED) from None
    if done.status != "succeeded" or done.file_id is None:
        reason = f": {done.error.message}" if done.error is not None else ""
        raise CliError(f"{done.id} {done.status}{reason}", FAILED)
    folder = output or Path(f"{job_id}-{dtype.value}")
    folder.mkdir(parents=True, exist_ok=True)
    archive = client.download_file(done.file_id, folder / f"{done.id}.tar")
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(folder, filter="data")  # refuses absolute paths, .. and links out of the folder
    finally:
        archive.unlink(missing_ok=True)
    typer.echo(str(folder))


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
