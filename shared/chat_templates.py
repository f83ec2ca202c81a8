"""Chat templates as data: the Alpaca prompt written as a Jinja chat template, and which template a model uses.

A template is the Jinja text a tokenizer's `apply_chat_template` renders (transformers' own renderer, at train
and at serve time alike, never string pasting here). GPT-2 ships none, so the base model's template comes from
the `chat_template` setting, or the tokenizer's own, or else ALPACA_CHAT_TEMPLATE. Every adapter stores the
template it was trained with (its tokenizer config and its manifest's `chat_template`); an adapter published
before templates were data trained on the Alpaca prompt, so it gets ALPACA_CHAT_TEMPLATE.

ALPACA_CHAT_TEMPLATE renders a one-turn conversation exactly as the Stanford prompt of shared.prompts:

- a user turn is an instruction: `<preamble>\\n\\n### Instruction:\\n{content}\\n\\n### Response:`; the preamble
  is the Stanford sentence (the "paired with an input" one when the turn carries an `input`, as Alpaca records
  do), or the content of a system message that comes first;
- an assistant turn is ` {content}<eos>` (the space keeps the first word the same BPE token it is elsewhere;
  content that already starts with white space gets none), so training learns to stop;
- later user turns follow as `\\n\\n### Instruction:\\n...### Response:`, so a conversation renders as the
  prefix of its continuation: the prompt at serve time is exactly the text training saw before each answer.

The template ends every user turn with the response header, so `add_generation_prompt` changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.prompts import PROMPT_NO_INPUT, PROMPT_WITH_INPUT

_PREAMBLE_NO_INPUT = PROMPT_NO_INPUT.split("\n\n", 1)[0]
_PREAMBLE_WITH_INPUT = PROMPT_WITH_INPUT.split("\n\n", 1)[0]

ALPACA_CHAT_TEMPLATE = (
    "{%- set ns = namespace(system=none, started=false) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if not ns.started -%}{%- set ns.system = message['content'] -%}{%- endif -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{%- if ns.started -%}{{ '\\n\\n' }}"
    "{%- elif ns.system is not none -%}{{ ns.system + '\\n\\n' }}"
    "{%- elif message.get('input') -%}{{ '" + _PREAMBLE_WITH_INPUT + "\\n\\n' }}"
    "{%- else -%}{{ '" + _PREAMBLE_NO_INPUT + "\\n\\n' }}"
    "{%- endif -%}"
    "{%- set ns.started = true -%}"
    "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{%- if message.get('input') -%}{{ '### Input:\\n' + message['input'] + '\\n\\n' }}{%- endif -%}"
    "{{ '### Response:' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if message['content'][:1].strip() -%}{{ ' ' }}{%- endif -%}"
    "{{ message['content'] + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

Conversation = list[dict[str, Any]]  # [{"role": "system"|"user"|"assistant", "content": str, ...}]


def base_chat_template(configured: str | None, tokenizer_template: str | None) -> str:
    """The base model's template: the setting, else the tokenizer's own, else the Alpaca one (GPT-2 ships none)."""
    return configured or tokenizer_template or ALPACA_CHAT_TEMPLATE


def adapter_chat_template(manifest: Mapping[str, Any] | None) -> str:
    """The template an adapter was trained with (its manifest's); the Alpaca one for an adapter from before."""
    stored = manifest.get("chat_template") if manifest else None
    return stored if isinstance(stored, str) and stored else ALPACA_CHAT_TEMPLATE


def alpaca_conversation(instruction: str, input: str = "", output: str | None = None) -> Conversation:
    """An Alpaca record as a conversation: the instruction (and input) as the user turn, the output as the answer."""
    user: dict[str, Any] = {"role": "user", "content": instruction}
    if input:
        user["input"] = input
    turns: Conversation = [user]
    if output is not None:
        turns.append({"role": "assistant", "content": output})
    return turns
