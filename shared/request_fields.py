"""What a request body may hold: JSON's own types (no coercion), and text a row and an answer can hold.

Every request body model derives from RequestModel, and every string field of one is Text (free text) or
Name (an id or name), so new fields are covered by writing them the same way:

- strict types, as the OpenAI API answers: `"max_tokens": "10"` and `"n": true` are refused, not coerced
  (a float field still takes an integer: JSON has one number type);
- Text refuses NUL and lone UTF-16 surrogates (shared.storable), which no row or answer can hold; other
  control characters (tab, newline, form feed, ...) are ordinary text in prompts and records;
- Name refuses every control character (C0, DEL, C1) and lone surrogates: ids, model and dataset names,
  module names and metadata keys are matched, logged and shown, never free text;
- a field that has a default takes it when sent as null, as OpenAI's nullable parameters do (`"temperature":
  null`, which generic clients and proxies send for "unset"); a required field sent as null is refused.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

from shared.storable import unstorable

_CONTROL_OR_SURROGATE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class RequestModel(BaseModel):
    """Base of every request body: unknown fields and coerced types are refused; null means a field's default."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_takes_the_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        defaulted = {name for name, field in cls.model_fields.items() if not field.is_required()}
        return {key: value for key, value in data.items() if value is not None or key not in defaulted}


def storable_text(value: str) -> str:
    """value when a row and a JSON answer can hold it; a validation error saying why otherwise."""
    reason = unstorable(value)
    if reason is not None:
        raise PydanticCustomError("unstorable_text", "text {reason}", {"reason": reason})
    return value


def plain_name(value: str) -> str:
    """value when it holds no control character or lone surrogate; a validation error otherwise."""
    found = _CONTROL_OR_SURROGATE.search(value)
    if found is not None:
        raise PydanticCustomError(
            "invalid_name",
            "must not contain control characters or lone surrogates (U+{code} at position {position})",
            {"code": f"{ord(found.group()):04X}", "position": found.start()},
        )
    return value


Text = Annotated[str, AfterValidator(storable_text)]
Name = Annotated[str, AfterValidator(plain_name)]
