"""`--hyperparameter key=value` options as a typed dict (ints, floats, booleans, JSON lists where they look it),
checked against the gateway's own rules (shared.fine_tuning.Hyperparameters) before anything is uploaded."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

import typer
from pydantic import ValidationError

from shared.fine_tuning import Hyperparameters

_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?$")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_value(text: str) -> Any:
    """The value a string stands for: int, float, bool, None, a JSON list or object, else the string itself."""
    value = text.strip()
    if _INT.match(value):
        return int(value)
    if _FLOAT.match(value):
        return float(value)
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "none"):
        return None
    if value.startswith(("[", "{")):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise typer.BadParameter(f"{value!r} looks like JSON but is not ({exc.msg})") from None
    return value  # "auto", "cosine", "nf4", ...


def parse_hyperparameters(items: Iterable[str]) -> dict[str, Any]:
    """{key: value} from key=value strings; BadParameter (exit 2) for a malformed or repeated key."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key):
            raise typer.BadParameter(f"expected key=value, got {item!r}", param_hint="--hyperparameter")
        if key in values:
            raise typer.BadParameter(f"{key} given twice", param_hint="--hyperparameter")
        values[key] = parse_value(text)
    check_hyperparameters(values)
    return values


def check_hyperparameters(values: dict[str, Any]) -> None:
    """BadParameter naming every value the gateway would refuse (its schema: ranges, types, unknown names).

    The gateway also applies its operator's caps (max_train_epochs, ...), which only it knows; those still
    answer 422 from the server, after the upload."""
    try:
        Hyperparameters.model_validate(values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            where = ".".join(
                str(part) for part in error["loc"] if not str(part).startswith(("int", "float", "literal"))
            )
            message = str(error["msg"]).removeprefix("Value error, ")
            given = f" (got {error['input']!r})" if where and error["type"] != "missing" else ""
            problems.append(f"{where}: {message}{given}" if where else message)
        raise typer.BadParameter("; ".join(dict.fromkeys(problems)), param_hint="--hyperparameter") from None
