"""`llmq chat`: an interactive conversation with a model, streamed, keeping its history.

Every turn sends the whole conversation to /v1/chat/completions, where the worker renders it with the
model's chat template (the one a fine-tuned model was trained with), so the CLI, the Python client, the
dashboard and the openai SDK all show the model the same text. Lines come from stdin (a terminal or a pipe);
/reset forgets the history (the system message stays), /exit or end of input ends the session.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from cli.api_commands import _base_model, connect
from cli.exit_codes import CliError
from client import LlmqClient


def _answer(client: LlmqClient, model: str, history: list[dict[str, Any]], options: dict[str, Any]) -> str:
    """Streams the model's answer to the conversation to stdout; the answer."""
    answer = ""
    for chunk in client.stream_chat(history, model=model, **options):
        if "error" in chunk:
            raise CliError(f"{chunk['error'].get('code')}: {chunk['error'].get('message')}")
        for choice in chunk.get("choices", []):
            piece = (choice.get("delta") or {}).get("content") or ""
            answer += piece
            typer.echo(piece, nl=False)
    typer.echo()
    return answer


def chat(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model id; default: the base model.")] = None,
    system: Annotated[str | None, typer.Option("--system", "-s", help="A system message to start with.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Most new tokens per answer.")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 means greedy.")] = None,
    seed: Annotated[int | None, typer.Option(help="Makes sampling reproducible.")] = None,
) -> None:
    """Chat with a model: each line you type is a user turn; answers stream as they are generated."""
    client = connect(ctx)
    model = model or _base_model(client)
    start: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    history = list(start)
    options = {k: v for k, v in {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}.items()
               if v is not None}  # fmt: skip
    interactive = sys.stdin.isatty()
    if interactive:
        typer.echo(f"Chatting with {model}. /reset forgets the conversation, /exit (or Ctrl-D) ends it.", err=True)
    while True:
        if interactive:
            typer.echo("> ", nl=False, err=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            break
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            history = list(start)
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        history.append({"role": "assistant", "content": _answer(client, model, history, options)})
