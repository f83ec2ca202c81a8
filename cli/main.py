"""The llmq command line: run the services (serve, worker, up, demo, migrate, make-model) and use them
(upload, finetune, jobs, status, events, cancel, generate, models, keys). Exit codes: cli/exit_codes.py."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cli import api_commands, batch_command, chat_command, keys, model_commands
from cli.api_commands import Connection
from cli.exit_codes import FAILED, USAGE, CliError, OneLineErrors
from cli.ports import check_ports
from cli.processes import (
    Children,
    gateway_command,
    new_instance_id,
    threads_per_worker,
    wait_ready,
    worker_command,
)
from client import DEFAULT_URL
from shared.settings import get_settings

app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Fine-tune GPT-2 with QLoRA and serve it.",
)
console = Console()


@app.callback(invoke_without_command=True)
def options(
    ctx: typer.Context,
    url: Annotated[str, typer.Option("--url", envvar="LLMQ_URL", help="The gateway's address.")] = DEFAULT_URL,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="LLMQ_API_KEY", help="Sent as a Bearer token.", show_default=False),
    ] = None,
    retries: Annotated[
        int, typer.Option(envvar="LLMQ_RETRIES", min=0, help="Retries after 429, 503 or a failed connection.")
    ] = 3,
) -> None:
    """Fine-tune GPT-2 with QLoRA and serve it."""
    if not url.startswith(("http://", "https://")):
        raise typer.BadParameter(f"{url!r} is not an http:// or https:// address", param_hint="--url")
    ctx.obj = Connection(url=url, api_key=api_key, retries=retries)
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(USAGE)


for _command in (
    api_commands.upload,
    api_commands.finetune,
    api_commands.jobs,
    api_commands.status,
    api_commands.events,
    api_commands.cancel,
    api_commands.generate,
    api_commands.models,
    chat_command.chat,
    batch_command.batch,
    model_commands.download,
    model_commands.export,
    model_commands.pause,
    model_commands.resume,
):
    app.command(rich_help_panel="Use a running llmq")(_command)
app.command(name="delete-model", rich_help_panel="Use a running llmq")(model_commands.delete_model)
app.add_typer(keys.app, name="keys", rich_help_panel="Administer")


@app.command()
def migrate() -> None:
    """Bring the database to the newest schema."""
    from shared.migrate import upgrade

    upgrade()


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to bind.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to bind.")] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Gateway processes (default: gateway_workers, LLMQ_GATEWAY_WORKERS).")
    ] = None,
) -> None:
    """Run the gateway."""
    settings = get_settings()
    host = host or settings.api_host
    _refuse_open_without_keys(host, settings.require_api_keys)
    processes = workers or settings.gateway_workers
    command = gateway_command(host, port or settings.api_port, processes)
    if processes > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # Several processes answer /metrics in turn: they share their counters through files (shared/counters.py).
        shared = settings.data_dir / "prometheus"
        shutil.rmtree(shared, ignore_errors=True)
        shared.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(shared)
    os.execv(command[0], command)


LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def _refuse_open_without_keys(host: str, require_api_keys: bool) -> None:
    """Without API keys the gateway may listen on this machine only; says so either way."""
    if require_api_keys:
        return
    if host not in LOCAL_HOSTS and not host.startswith("127."):
        raise CliError(
            f"refusing to listen on {host} without API keys: set LLMQ_REQUIRE_API_KEYS=true "
            "(and create keys with `llmq keys create`) or bind to 127.0.0.1",
            USAGE,
        )
    console.print(f"[yellow]API keys are not required: listening on {host} only (LLMQ_REQUIRE_API_KEYS=false)[/]")


@app.command()
def worker(queue: Annotated[str, typer.Option(help="generate or train")] = "generate") -> None:
    """Run a worker for one queue."""
    if queue not in ("generate", "train"):
        raise typer.BadParameter("queue must be generate or train")
    command = worker_command(queue)
    os.execv(command[0], command)


@app.command()
def up() -> None:
    """Run gateway and both workers on this machine until Ctrl-C."""
    from shared.migrate import upgrade

    settings = get_settings()
    _refuse_open_without_keys(settings.api_host, settings.require_api_keys)
    port = settings.worker_metrics_port or settings.api_port
    check_ports(settings, metrics_ports=(port + 1, port + 2))
    upgrade()
    base_url = f"http://{settings.api_host}:{settings.api_port}"
    children = Children(env=dict(os.environ), log_dir=settings.data_dir / "logs")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        instance = new_instance_id()
        children.start("gateway", gateway_command(settings.api_host, settings.api_port), {"LLMQ_INSTANCE_ID": instance})
        threads = {"LLMQ_TORCH_THREADS": str(threads_per_worker(settings.torch_threads, workers=2))}
        generate_env = {**threads, "LLMQ_WORKER_METRICS_PORT": str(port + 1)}  # each worker's own /metrics
        children.start("worker-generate", worker_command("generate"), env=generate_env)
        children.start(
            "worker-train", worker_command("train"), env={**threads, "LLMQ_WORKER_METRICS_PORT": str(port + 2)}
        )
        wait_ready(base_url, children, instance=instance)  # "up" only once our own gateway answers
        console.print(f"llmq is up at {base_url} (logs in {children.log_dir}); Ctrl-C stops it")
        while True:
            children.check_alive()
            time.sleep(1)
    except KeyboardInterrupt:
        console.print("stopping")
    except RuntimeError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(FAILED) from None
    finally:
        children.stop_all()


@app.command()
def demo() -> None:
    """Start everything on the embedded default and show a fine-tune change what the model answers."""
    from cli.demo import run_demo

    raise typer.Exit(run_demo(get_settings(), console))


@app.command("make-model")
def make_model(
    out_dir: Path,
    pretrained: Annotated[
        bool, typer.Option("--pretrained", help="4 layers x 256 wide, pretrained on shipped English: it learns.")
    ] = False,
    full_size: Annotated[bool, typer.Option("--full-size", help="GPT-2 124M architecture, random weights.")] = False,
    tiny: Annotated[bool, typer.Option("--tiny", help="2 layers x 128 wide, random weights (the default).")] = False,
) -> None:
    """Build a GPT-2 offline (tokenizer trained on shipped text) into OUT_DIR."""
    if tiny + full_size + pretrained > 1:
        raise typer.BadParameter("give one of --tiny, --pretrained or --full-size")
    from worker.model_factory import build_full_size_gpt2, build_tiny_gpt2, install_pretrained_gpt2

    if pretrained:
        path = install_pretrained_gpt2(out_dir)
    elif full_size:
        path = build_full_size_gpt2(out_dir)
    else:
        path = build_tiny_gpt2(out_dir)
    console.print(str(path))


def main() -> None:
    """Entry point of the `llmq` command."""
    app()
