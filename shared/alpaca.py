"""Validating Alpaca-style training data: JSONL, or one JSON array, of instruction/input/output.

Every record is checked (UTF-8, an object, required string fields, no unknown keys, length caps, text a row
and an answer can hold, a record-count cap); the first bad record is reported with its line (JSONL) or index
(array).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from shared.storable import unstorable

REQUIRED = ("instruction", "output")
OPTIONAL = ("input",)


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


def check_record(record: object, where: str, limits: Limits) -> dict[str, str]:
    """The record as {instruction, input, output}; BadRecord naming where and why otherwise."""
    if not isinstance(record, dict):
        raise BadRecord(where, f"expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise BadRecord(where, f"unknown field {unknown[0]!r} (allowed: instruction, input, output)")
    for name in REQUIRED:
        if name not in record:
            raise BadRecord(where, f"missing required field {name!r}")
    clean = {}
    for name in (*REQUIRED[:1], *OPTIONAL, *REQUIRED[1:]):
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
        clean[name] = value
    if not clean["instruction"].strip():
        raise BadRecord(where, "field 'instruction' is empty")
    if not clean["output"].strip():
        raise BadRecord(where, "field 'output' is empty")
    return clean


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


def _jsonl(stream: IO[bytes], limits: Limits) -> Iterator[dict[str, str]]:
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


def _array(stream: IO[bytes], limits: Limits) -> Iterator[dict[str, str]]:
    records = _parse(_text(stream.read(), "file"), None)
    if not isinstance(records, list):
        raise BadRecord("file", "expected a JSON array of records or JSON Lines")
    if len(records) > limits.max_records:
        raise BadRecord(f"record {limits.max_records}", f"more than {limits.max_records} records")
    for index, record in enumerate(records):
        yield check_record(record, f"record {index}", limits)


def read_records(path: Path, limits: Limits) -> Iterator[dict[str, str]]:
    """Every record of a JSONL file or a JSON-array file, validated; BadRecord at the first bad one."""
    with path.open("rb") as stream:
        head = stream.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        stream.seek(0)
        if stream.read(3) != b"\xef\xbb\xbf":
            stream.seek(0)
        reader = _array if head.startswith(b"[") else _jsonl
        yield from reader(stream, limits)
