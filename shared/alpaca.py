"""Validating training data: JSONL, or one JSON array, of records in a format users already have.

    Alpaca               {"instruction", "input"?, "output"}; Hugging Face's export of tatsu-lab/alpaca also
                         carries "text" (the three rendered with the template), which is ignored
    prompt/completion    OpenAI's legacy fine-tuning format {"prompt", "completion"}: trained as given, the
                         prompt untemplated, loss on the completion

check_record tells the formats apart by their keys (a small dispatch: one checker per format); a record that
mixes them, or carries any other key, is refused.

Every record is checked (UTF-8, an object, required string fields, no unknown keys, length caps, text a row
and an answer can hold, a record-count cap); the first bad record is reported with its line (JSONL) or index
(array). The one definition of a valid record: the gateway checks uploads with it (under the operator's caps),
the train worker the stored file and hub dataset rows it trains on (uncapped: the caps are the upload's).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from shared.chat_records import check_chat_record, is_chat_record
from shared.storable import unstorable

REQUIRED = ("instruction", "output")
OPTIONAL = ("input",)
FIELDS = ("instruction", "input", "output")  # a checked Alpaca record's keys, in this order
DERIVED = ("text",)  # columns Alpaca exports derive from the fields (tatsu-lab/alpaca's "text"): ignored
PROMPT_COMPLETION = ("prompt", "completion")  # a checked prompt/completion record's keys

# {instruction, input, output} (input "" when the record has none) or {prompt, completion}
Record = dict[str, str]


class BadRecord(ValueError):
    """The data is not valid Alpaca; `where` says which record (line or index) and the message why."""

    def __init__(self, where: str, why: str) -> None:
        super().__init__(f"{where}: {why}")
        self.where = where
        self.why = why


@dataclass(frozen=True)
class Limits:
    max_records: int
    max_field_chars: int


UNCAPPED = Limits(max_records=sys.maxsize, max_field_chars=sys.maxsize)


def check_record(record: object, where: str, limits: Limits) -> Record:
    """The record as {instruction, input, output} or {prompt, completion}; BadRecord naming where and why
    otherwise.

    A record holding `messages` is a chat record, checked by shared.chat_records instead."""
    if is_chat_record(record):
        assert isinstance(record, dict)
        return check_chat_record(record, where, limits)
    if not isinstance(record, dict):
        raise BadRecord(where, f"expected a JSON object, got {type(record).__name__}")
    if set(record) & set(PROMPT_COMPLETION):
        return check_prompt_completion(record, where, limits)
    return check_alpaca(record, where, limits)


def is_prompt_completion(record: Record) -> bool:
    """Whether a checked record is in the prompt/completion format (else it is Alpaca)."""
    return "prompt" in record


def check_prompt_completion(record: dict[object, object], where: str, limits: Limits) -> Record:
    """A {prompt, completion} record, both non-empty strings; BadRecord otherwise."""
    unknown = sorted(str(k) for k in set(record) - set(PROMPT_COMPLETION))
    if unknown:
        raise BadRecord(where, f"unknown field {unknown[0]!r} (a prompt/completion record has only those two)")
    for name in PROMPT_COMPLETION:
        if name not in record:
            raise BadRecord(where, f"missing required field {name!r}")
    clean = {name: _field(record, name, where, limits) for name in PROMPT_COMPLETION}
    for name in PROMPT_COMPLETION:
        if not clean[name].strip():
            raise BadRecord(where, f"field {name!r} is empty")
    return clean


def check_alpaca(record: dict[object, object], where: str, limits: Limits) -> Record:
    """An Alpaca record as {instruction, input, output} (derived columns dropped); BadRecord otherwise."""
    unknown = sorted(str(k) for k in set(record) - set(FIELDS) - set(DERIVED))
    if unknown:
        raise BadRecord(where, f"unknown field {unknown[0]!r} (allowed: instruction, input, output)")
    for name in REQUIRED:
        if name not in record:
            raise BadRecord(where, f"missing required field {name!r}")
    clean = {name: _field(record, name, where, limits) for name in FIELDS}
    for name in REQUIRED:
        if not clean[name].strip():
            raise BadRecord(where, f"field {name!r} is empty")
    return clean


def _field(record: dict[object, object], name: str, where: str, limits: Limits) -> str:
    """One field's text ("" for a missing or null optional one); BadRecord otherwise."""
    value = record.get(name, "")
    if value is None and name in OPTIONAL:
        value = ""
    if not isinstance(value, str):
        raise BadRecord(where, f"field {name!r} must be a string, got {type(value).__name__}")
    if len(value) > limits.max_field_chars:
        raise BadRecord(where, f"field {name!r} is longer than {limits.max_field_chars} characters")
    reason = unstorable(value)
    if reason is not None:
        raise BadRecord(where, f"field {name!r} {reason}")
    return value


def _text(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRecord(where, f"not valid UTF-8 (byte {exc.start})") from None


def _parse(text: str, where: str | None) -> object:
    """The JSON value of text; BadRecord at where (or at the line of the error) when it is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRecord(where or f"line {exc.lineno}", f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    except ValueError:  # Python refuses integers of more than 4,300 digits (int_max_str_digits)
        raise BadRecord(where or "file", "a number with more than 4300 digits") from None


def jsonl_records(stream: IO[bytes], limits: Limits) -> Iterator[Record]:
    """Every record of JSON Lines read from stream, validated; BadRecord at the first bad one."""
    count = 0
    for number, raw in enumerate(stream, start=1):
        where = f"line {number}"
        line = _text(raw, where).strip()
        if not line:
            continue
        record = _parse(line, where)
        count += 1
        if count > limits.max_records:
            raise BadRecord(where, f"more than {limits.max_records} records")
        yield check_record(record, where, limits)


def _array(stream: IO[bytes], limits: Limits) -> Iterator[Record]:
    records = _parse(_text(stream.read(), "file"), None)
    if not isinstance(records, list):
        raise BadRecord("file", "expected a JSON array of records or JSON Lines")
    if len(records) > limits.max_records:
        raise BadRecord(f"record {limits.max_records}", f"more than {limits.max_records} records")
    for index, record in enumerate(records):
        yield check_record(record, f"record {index}", limits)


def read_records(path: Path, limits: Limits) -> Iterator[Record]:
    """Every record of a JSONL file or a JSON-array file, validated; BadRecord at the first bad one."""
    with path.open("rb") as stream:
        head = stream.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        stream.seek(0)
        if stream.read(3) != b"\xef\xbb\xbf":
            stream.seek(0)
        reader = _array if head.startswith(b"[") else jsonl_records
        yield from reader(stream, limits)
