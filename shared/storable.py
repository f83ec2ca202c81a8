"""Text and JSON that a database row and a JSON answer can hold, and making the service's own values so.

Postgres text cannot hold NUL (U+0000); its jsonb refuses NUL and lone UTF-16 surrogates (U+D800-U+DFFF);
UTF-8, the encoding of every answer, cannot encode a lone surrogate; JSON has no NaN or Infinity. A request
holding such text is refused at validation (shared.request_fields). What the service writes on its own
(generated text, error messages, training figures) passes through `scrub_json`, which every database engine
uses as its JSON serializer: each NUL and lone surrogate becomes U+FFFD, each non-finite float null.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

REPLACEMENT = "\ufffd"  # what Unicode decoders put where text could not be decoded
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def unstorable(text: str) -> str | None:
    """Why a database row or a JSON answer cannot hold this text, or None when it can."""
    found = _UNSTORABLE.search(text)
    if found is None:
        return None
    char = found.group()
    what = "a NUL character (U+0000)" if char == "\x00" else f"a lone UTF-16 surrogate (U+{ord(char):04X})"
    return f"contains {what} at position {found.start()}"


def scrub(text: str) -> str:
    """The text with every NUL and lone surrogate replaced by U+FFFD (the same text when it holds none)."""
    return _UNSTORABLE.sub(REPLACEMENT, text) if _UNSTORABLE.search(text) else text


def scrub_json(value: Any) -> Any:
    """A JSON value every reader can read: strings (keys too) scrubbed, non-finite floats as null."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {scrub(k) if isinstance(k, str) else k: scrub_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub_json(item) for item in value]
    return value


def dumps(value: Any) -> str:
    """The JSON text of a column value, scrubbed (the engines' json_serializer)."""
    return json.dumps(scrub_json(value), allow_nan=False)
