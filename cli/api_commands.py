"""The `llmq` commands that talk to a running gateway, through client.LlmqClient.

Results go to stdout (plain lines, tables, or JSON with --json); progress and notes go to stderr, so
`MODEL=$(llmq finetune --file data.jsonl --follow)` captures just the fine-tuned model id.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from pydantic import BaseModel
from rich.console import Console, RenderableType

from cli import views
from cli.exit_codes import FAILED, INTERRUPTED, CliError
from cli.fine_tune_progress import follow_fine_tune
from cli.hyperparameters import parse_hyperparameters
from client import LlmqClient
from shared.schemas import FineTuningJob, GenerationJob
from shared.statuses import JobStatus

err = Console(stderr=True, soft_wrap=True)

JsonOption = Annotated[bool, typer.Option("--json", help="Print the server's JSON answer.")]
JobIdArgument = Annotated[str, typer.Argument(help="A job id (gen-... or ftjob-...).", show_default=False)]


@dataclass(frozen=True)
class Connection:
    """Where the gateway is and how to authenticate (the global --url and --api-key)."""

    url: str
    api_key: str | None
    retries: int = 3


def connect(ctx: typer.Context) -> LlmqClient:
    """A client for this command's gateway, closed when the command ends."""
    connection = ctx.find_object(Connection)
    if connection is None:
        return ctx.with_resource(LlmqClient())
    return ctx.with_resource(LlmqClient(connection.url, connection.api_key, retries=connection.retries))


def print_json(model: BaseModel) -> None:
    typer.echo(model.model_dump_json(indent=2))


def print_lines(lines: list[str]) -> None:
    for line in lines:
        typer.echo(line)


def print_listing(table: Callable[[int], RenderableType], lines: Callable[[], list[str]]) -> None:
    """A table sized to the terminal; when stdout is not a terminal (a pipe, a file), plain tab-separated lines
    with no header and nothing cut, for cut, awk and grep."""
    console = Console(soft_wrap=False)  # made now: it reads the terminal's size and COLUMNS at this moment
    if console.is_terminal:
        console.print(table(console.width))
    else:
        print_lines(lines())


def _failure(job: GenerationJob | FineTuningJob) -> CliError:
    reason = f": {job.error.message}" if job.error is not None else ""
    return CliError(f"{job.id} {job.status}{reason}", FAILED)


class Kind(StrEnum):
    generate = "generate"
    train = "train"
    export = "export"


def upload(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="Alpaca JSONL or JSON.")],
    as_json: JsonOption = False,
) -> None:
    """Upload an Alpaca training file; the server checks every record and names the first bad one."""
    uploaded = connect(ctx).upload_file(file)
    if as_json:
        print_json(uploaded)
    else:
        typer.echo(views.file_line(uploaded))


def _training_file(client: LlmqClient, value: str, option: str) -> str:
    """The file id for --file: a local file is uploaded first; an id of an uploaded file is used as it is."""
    path = Path(value)
    if path.is_file():
        uploaded = client.upload_file(path)
        err.print(f"uploaded {path} as {views.file_line(uploaded)}", markup=False, highlight=False)
        return uploaded.id
    if value.startswith("file-") and "/" not in value:
        return value
    raise typer.BadParameter(f"{value}: no such file (nor an uploaded file id)", param_hint=option)


def _base_model(client: LlmqClient) -> str:
    for model in client.list_models().data:
        if model.parent is None:
            return model.id
    raise CliError("the server lists no base model to fine-tune; give --model")


def finetune(
    ctx: typer.Context,
    file: Annotated[str, typer.Option("--file", "-f", help="Training data: a local file (uploaded) or a file id.")],
    validation_file: Annotated[
        str | None, typer.Option("--validation-file", help="Validation data: a local file or a file id.")
    ] = None,
    suffix: Annotated[str | None, typer.Option(help="Goes into the model id: ft:<base>:<suffix>:<job>.")] = None,
    hyperparameter: Annotated[
        list[str] | None,
        typer.Option(
            "--hyperparameter",
            "-p",
            help="key=value, repeatable (n_epochs=3, lora_r=8, packing=true, target_modules='[\"c_attn\"]').",
        ),
    ] = None,
    model: Annotated[str | None, typer.Option(help="Base model; default: the server's.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the run.")] = None,
    follow: Annotated[
        bool, typer.Option("--follow", help="Show live progress; print the model id at the end.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Start a QLoRA fine-tune of the base model on an Alpaca file."""
    hyperparameters = parse_hyperparameters(hyperparameter or [])  # usage errors before any upload
    client = connect(ctx)
    training_id = _training_file(client, file, "--file")
    validation_id = _training_file(client, validation_file, "--validation-file") if validation_file else None
    job = client.create_fine_tuning_job(
        model=model or _base_model(client),
        training_file=training_id,
        validation_file=validation_id,
        suffix=suffix,
        seed=seed,
        hyperparameters=hyperparameters,
    )
    if not follow:
        if as_json:
            print_json(job)
        else:
            typer.echo(f"{job.id}  {job.status}")
            err.print(f"follow it with: llmq events {job.id} --follow", markup=False, highlight=False)
        return
    err.print(f"{job.id} {job.status}; following it (Ctrl-C stops following, not the job)", markup=False)
    try:
        final = follow_fine_tune(client, job.id, err)
    except KeyboardInterrupt:
        err.print(f"stopped following {job.id}; it goes on (llmq status {job.id})", markup=False, highlight=False)
        raise typer.Exit(INTERRUPTED) from None
    if as_json:
        print_json(final)
    if final.status != "succeeded":
        raise _failure(final)
    if not as_json:
        typer.echo(final.fine_tuned_model)


def jobs(
    ctx: typer.Context,
    kind: Annotated[Kind | None, typer.Option(help="Only jobs of this kind.")] = None,
    status: Annotated[JobStatus | None, typer.Option(help="Only jobs in this status.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100, help="Jobs per page.")] = 20,
    after: Annotated[str | None, typer.Option(help="Start after this job id (the next page).")] = None,
    as_json: JsonOption = False,
) -> None:
    """List jobs of every kind, newest first."""
    page = connect(ctx).list_jobs(
        kind=kind.value if kind else None, status=status.value if status else None, limit=limit, after=after
    )
    if as_json:
        print_json(page)
        return
    if not page.data:
        err.print("no jobs", markup=False)
        return
    print_listing(lambda width: views.jobs_table(page.data, width), lambda: views.job_rows(page.data))
    if page.has_more:
        err.print(f"more: llmq jobs --after {page.data[-1].id}", markup=False, highlight=False)


def status(ctx: typer.Context, job_id: JobIdArgument, as_json: JsonOption = False) -> None:
    """Show any job (generation, fine-tune or export); exits 1 when it failed or was cancelled."""
    job = connect(ctx).get_job_detail(job_id)
    if as_json:
        print_json(job)
    elif isinstance(job, GenerationJob):
        queue = connect(ctx).get_job(job_id).queue if job.status == "queued" else None
        queued = [f"queue     {views.queue_text(queue, 'generate')}"] if queue is not None else []
        print_lines(views.generation_lines(job) + queued)
    elif isinstance(job, FineTuningJob):
        print_lines(views.fine_tune_lines(job))
    else:
        lines = [f"id        {job.id}", f"kind      {job.kind}", f"status    {job.status}", f"model     {job.model}"]
        error = [f"error     {job.error.code}: {job.error.message}"] if job.error is not None else []
        print_lines(lines + error)
    if job.status in ("failed", "cancelled"):
        raise typer.Exit(FAILED)


def events(
    ctx: typer.Context,
    job_id: JobIdArgument,
    follow: Annotated[bool, typer.Option("--follow", help="Keep printing new events until the job ends.")] = False,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many recent events (without --follow).")] = 20,
) -> None:
    """Print a fine-tuning job's events, oldest first; with --follow, exits 1 if the job fails."""
    client = connect(ctx)
    if not follow:
        for event in reversed(client.list_fine_tuning_events(job_id, limit=limit).data):
            typer.echo(views.event_line(event))
        return
    try:
        for event in client.follow_events(job_id):
            typer.echo(views.event_line(event))
    except KeyboardInterrupt:
        raise typer.Exit(INTERRUPTED) from None
    final = client.get_fine_tuning_job(job_id)
    if final.status != "succeeded":
        raise _failure(final)


def cancel(ctx: typer.Context, job_id: JobIdArgument) -> None:
    """Cancel a job: a queued one at once; a running fine-tune after its current step."""
    job = connect(ctx).cancel(job_id)
    if job.status == "cancelled":
        typer.echo(f"{job.id} cancelled")
    elif job.status in ("queued", "running"):
        how = "a running generation batch finishes" if isinstance(job, GenerationJob) else "stops after this step"
        typer.echo(f"{job.id} {job.status}: cancellation requested ({how})")
    else:
        raise CliError(f"{job.id} already {job.status}; nothing to cancel")


def generate(
    ctx: typer.Context,
    prompts: Annotated[list[str], typer.Argument(help="One or more prompts; - reads one from stdin.")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model id; default: the base model.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Most new tokens per prompt.")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 means greedy.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="A string that ends the text; repeatable.")] = None,
    seed: Annotated[int | None, typer.Option(help="Makes sampling reproducible.")] = None,
    timeout: Annotated[float | None, typer.Option(help="Give up waiting after this many seconds.")] = None,
    template: Annotated[
        bool, typer.Option("--template", help="Send each prompt as a user turn in the model's chat template.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Generate text: submit a job, wait for it, print each output."""
    texts = [sys.stdin.read() if p == "-" else p for p in prompts]
    client = connect(ctx)
    job = client.create_generation(
        texts[0] if len(texts) == 1 else texts,
        model=model,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=stop,
        seed=seed,
        template="model" if template else None,
    )
    job = client.wait_generation(job.id, timeout=timeout)
    if as_json:
        print_json(job)
    elif job.outputs:
        for output in job.outputs:
            if len(job.outputs) > 1:
                typer.echo(f"--- [{output.index}] {output.finish_reason}, {output.completion_tokens} tokens")
            typer.echo(output.text)
    if job.status != "succeeded":
        raise _failure(job)


def models(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """List the models a generation may name: the base model and every fine-tuned one."""
    listed = connect(ctx).list_models()
    if as_json:
        print_json(listed)
    else:
        print_listing(lambda width: views.models_table(listed.data, width), lambda: views.model_rows(listed.data))
