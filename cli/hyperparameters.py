"""`--hyperparameter key=value` options as a typed dict (ints, floats, booleans, JSON lists where they look it)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

import typer

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
    return values
