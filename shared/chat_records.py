"""Validating chat-format training records: `{"messages": [{"role", "content", "weight"?}, ...]}`, OpenAI's
fine-tuning format, one per JSONL line (checked by shared.alpaca's readers, which hand a record holding
`messages` over to check_chat_record).

A valid conversation: an optional system message first, then user and assistant turns taking turns, starting
with a user turn and ending with an assistant turn; every content a non-empty string (or a list of text parts,
joined); `weight` (0 or 1, OpenAI's) only on assistant turns, and at least one assistant turn trained. A
conversation longer than max_seq_len can only be measured with the tokenizer: the train worker reports it
(worker/chat_data.py), naming the same line.

A checked record is held as shared.alpaca.Record (text fields): `messages` is the conversation as canonical JSON
and `where` the line it came from, so the worker can name it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from shared.storable import unstorable

if TYPE_CHECKING:
    from shared.alpaca import Limits, Record

ROLES = ("system", "user", "assistant")
MESSAGE_FIELDS = ("role", "content", "weight", "name")


def is_chat_record(record: object) -> bool:
    """Whether a parsed JSON record is in the messages format (checked here, not as Alpaca)."""
    return isinstance(record, dict) and "messages" in record


def _bad(where: str, why: str) -> Exception:
    from shared.alpaca import BadRecord

    return BadRecord(where, why)


def _content(message: dict[str, Any], at: str, where: str, limits: Limits) -> str:
    content = message.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        content = "".join(str(p.get("text", "")) for p in content)
    if not isinstance(content, str):
        raise _bad(where, f"{at}: content must be a string, got {type(content).__name__}")
    if not content.strip():
        raise _bad(where, f"{at}: content is empty")
    if len(content) > limits.max_field_chars:
        raise _bad(where, f"{at}: content is longer than {limits.max_field_chars} characters")
    reason = unstorable(content)
    if reason is not None:
        raise _bad(where, f"{at}: content {reason}")
    return content


def _message(message: object, index: int, where: str, limits: Limits) -> dict[str, Any]:
    at = f"message {index}"
    if not isinstance(message, dict):
        raise _bad(where, f"{at}: expected a JSON object, got {type(message).__name__}")
    unknown = sorted(set(message) - set(MESSAGE_FIELDS))
    if unknown:
        raise _bad(where, f"{at}: unknown field {unknown[0]!r} (allowed: role, content, weight, name)")
    role = message.get("role")
    if role not in ROLES:
        raise _bad(where, f"{at}: role must be one of system, user, assistant, got {role!r}")
    clean: dict[str, Any] = {"role": role, "content": _content(message, at, where, limits)}
    if "weight" in message:
        weight = message["weight"]
        if role != "assistant":
            raise _bad(where, f"{at}: weight is only allowed on assistant messages")
        if type(weight) is not int or weight not in (0, 1):
            raise _bad(where, f"{at}: weight must be 0 or 1, got {weight!r}")
        clean["weight"] = weight
    return clean


def _check_order(messages: list[dict[str, Any]], where: str) -> None:
    """System first (optional), then user/assistant alternating from a user turn to an assistant turn."""
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for i, message in enumerate(turns):
        index = i + len(messages) - len(turns)
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise _bad(where, f"message {index}: expected a {expected} message, got {message['role']}")
    if not turns or turns[-1]["role"] != "assistant":
        raise _bad(where, "the conversation must end with an assistant message")
    if not any(m["role"] == "assistant" and m.get("weight", 1) == 1 for m in turns):
        raise _bad(where, "no assistant message to train on (every one has weight 0)")


def check_chat_record(record: dict[Any, Any], where: str, limits: Limits) -> Record:
    """The record with its conversation checked, as {"messages": canonical JSON, "where": where}."""
    unknown = sorted(str(k) for k in set(record) - {"messages"})
    if unknown:
        raise _bad(where, f"unknown field {unknown[0]!r} (a chat record holds only messages)")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise _bad(where, "messages must be a non-empty list")
    clean = [_message(m, i, where, limits) for i, m in enumerate(messages)]
    _check_order(clean, where)
    return {"messages": json.dumps(clean, ensure_ascii=False, sort_keys=True), "where": where}


def stored_record(record: Record) -> dict[str, Any]:
    """A checked record as the store keeps it: a chat record as {"messages": [...]}, an Alpaca one as it is."""
    if "messages" in record:
        return {"messages": conversation(record)}
    return dict(record)


def conversation(record: Record) -> list[dict[str, Any]]:
    """The checked conversation a chat record holds."""
    turns: list[dict[str, Any]] = json.loads(record["messages"])
    return turns
