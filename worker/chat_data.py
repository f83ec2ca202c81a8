"""Training examples rendered with a chat template, as the trainer sees them.

Every example is rendered by the tokenizer's apply_chat_template (worker/chat_rendering.py), the renderer the
generate worker uses for the same conversation, so the prompt a model is served is exactly the text it was
trained on before each answer (tests/test_chat_training.py holds the two to the same tokens).

- Alpaca records only: the Alpaca chat template; each record a prompt/completion pair (the text before and
  after the answer's start), which TRL trains with completion-only loss and EOS appended.
- Any chat record (`messages`): the job's template (the base model's); every conversation tokenized whole,
  labels on the tokens of the assistant turns of weight 1 (their text and EOS), -100 elsewhere. A
  conversation longer than max_length fails the job naming its line, instead of being cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shared.alpaca import Record
from shared.chat_records import conversation
from shared.chat_templates import ALPACA_CHAT_TEMPLATE, Conversation, alpaca_conversation
from worker.alpaca_data import DatasetUnavailable
from worker.chat_rendering import base_template, render

IGNORE = -100  # label of a token that is not trained


def has_chat_records(records: Sequence[Record]) -> bool:
    return any("messages" in r for r in records)


def job_chat_template(records: Sequence[Record], tokenizer: Any, configured: str | None) -> str:
    """The template a job trains with: Alpaca's for Alpaca records, the base model's once any record is a chat."""
    return base_template(tokenizer, configured) if has_chat_records(records) else ALPACA_CHAT_TEMPLATE


def as_conversation(record: Record) -> Conversation:
    if "messages" in record:
        return conversation(record)
    return alpaca_conversation(record["instruction"], record.get("input", ""), record["output"])


def prompt_completion(record: Record, tokenizer: Any, template: str) -> dict[str, str]:
    """An Alpaca record's prompt and completion under the template (EOS left for the trainer to append)."""
    turns = as_conversation(record)
    prompt = render(tokenizer, template, turns[:-1])
    whole = render(tokenizer, template, turns, prompt=False)
    if not whole.startswith(prompt):
        raise DatasetUnavailable("the chat template does not render a conversation as the prefix of its answer")
    completion = whole[len(prompt) :]
    eos = str(tokenizer.eos_token or "")
    return {"prompt": prompt, "completion": completion[: -len(eos)] if eos and completion.endswith(eos) else completion}


def _trained_spans(tokenizer: Any, template: str, turns: Conversation, whole: str) -> list[tuple[int, int]]:
    """Character spans of whole that are assistant turns of weight 1 (their text, through EOS)."""
    spans = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        start = len(render(tokenizer, template, turns[:i]))
        upto = render(tokenizer, template, turns[: i + 1], prompt=False)
        if not whole.startswith(upto):
            raise DatasetUnavailable("the chat template does not render a conversation as the prefix of its end")
        if turn.get("weight", 1):
            spans.append((start, len(upto)))
    return spans


def tokenized(record: Record, tokenizer: Any, template: str, max_length: int) -> dict[str, list[int]]:
    """A conversation's input_ids and labels (assistant turns of weight 1 only); DatasetUnavailable when it is
    longer than max_length tokens."""
    turns = as_conversation(record)
    whole = render(tokenizer, template, turns, prompt=False)
    spans = _trained_spans(tokenizer, template, turns, whole)
    encoded = tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(encoded["input_ids"])
    if len(ids) > max_length:
        where = record.get("where", "a record")
        raise DatasetUnavailable(
            f"{where}: the conversation is {len(ids)} tokens, longer than max_seq_len ({max_length}); "
            "shorten it or raise max_seq_len"
        )
    labels = [
        token if any(start <= begin < end for start, end in spans) else IGNORE
        for token, (begin, _) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    return {"input_ids": ids, "labels": labels}


def training_examples(
    records: Sequence[Record], tokenizer: Any, template: str, max_length: int
) -> list[dict[str, Any]]:
    """What the trainer trains on: prompt/completion pairs for Alpaca records, tokenized conversations (input_ids,
    labels) once any record is a chat."""
    if not has_chat_records(records):
        return [prompt_completion(r, tokenizer, template) for r in records]
    return [tokenized(r, tokenizer, template, max_length) for r in records]
