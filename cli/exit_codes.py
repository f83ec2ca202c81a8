"""The llmq command's exit codes, and the one line on stderr each failure prints instead of a traceback.

    0    success
    1    the job failed or was cancelled; the server refused the request (unknown id, invalid input,
         bad credentials, rate limit); a wait ran out of time
    2    usage error: unknown command or option, bad value, missing argument, missing local file
    3    the server is unreachable (refused, unresolvable, timed out) or unavailable (503 after retries)
    130  interrupted (Ctrl-C)

Set LLMQ_DEBUG=1 to get the traceback of an unexpected error instead of its one line.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import typer
from typer.core import TyperGroup

from client.errors import LlmqError, UnavailableError, UnreachableError

OK = 0
FAILED = 1
USAGE = 2
UNREACHABLE = 3
INTERRUPTED = 130


class CliError(Exception):
    """A failure a command reports as one line on stderr, with its exit code."""

    def __init__(self, message: str, exit_code: int = FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def exit_code_for(error: LlmqError) -> int:
    """The exit code of a client error: 3 when the server could not be reached or cannot serve, else 1."""
    return UNREACHABLE if isinstance(error, UnreachableError | UnavailableError) else FAILED


def _one_line(text: str) -> str:
    return " ".join(text.split())


class OneLineErrors(TyperGroup):
    """The root command group: runs a command and turns whatever it raises into one line and an exit code."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        message: str | None = None
        try:
            result = super().main(
                args, prog_name, complete_var, standalone_mode=False, windows_expand_args=windows_expand_args, **extra
            )
            code = result if isinstance(result, int) else OK  # an int here is a typer.Exit code
        except typer.TyperException as exc:  # click's usage errors and friends
            code = exc.exit_code
            message = exc.format_message()
            context = getattr(exc, "ctx", None)
            if code == USAGE and context is not None:
                message = f"{_one_line(message)} (see '{context.command_path} --help')"
        except typer.Abort:
            code, message = FAILED, "aborted"
        except LlmqError as exc:
            code, message = exit_code_for(exc), exc.message
        except CliError as exc:
            code, message = exc.exit_code, exc.message
        except Exception as exc:
            if os.environ.get("LLMQ_DEBUG"):
                raise
            code, message = FAILED, f"unexpected {type(exc).__name__}: {exc} (LLMQ_DEBUG=1 shows the traceback)"
        if message is not None:
            typer.echo(f"error: {_one_line(message)}", err=True)
        if standalone_mode:
            sys.exit(code)
        return code
