"""Conversations rendered as prompts with a chat template: the tokenizer's own apply_chat_template (Jinja), the
one renderer at train time (worker/chat_data.py) and at serve time (a chat job's conversations, here)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shared.chat_templates import Conversation, base_chat_template
from shared.job_data import GenerationParams


def render(tokenizer: Any, template: str, conversation: Sequence[dict[str, Any]], *, prompt: bool = True) -> str:
    """The conversation's text under the template; prompt: ready for the assistant's next turn."""
    text = tokenizer.apply_chat_template(
        list(conversation), chat_template=template, tokenize=False, add_generation_prompt=prompt
    )
    return str(text)


def base_template(tokenizer: Any, configured: str | None) -> str:
    """The base model's template: the chat_template setting, the tokenizer's own, or the Alpaca one."""
    return base_chat_template(configured, getattr(tokenizer, "chat_template", None))


def with_rendered_prompts(params: GenerationParams, tokenizer: Any, configured: str | None) -> GenerationParams:
    """params whose prompts are its conversations rendered with its template (the base model's when it names
    none); params as they are when they hold no conversations."""
    if params.conversations is None:
        return params
    template = params.chat_template or base_template(tokenizer, configured)
    conversations: list[Conversation] = [[t.model_dump() for t in c] for c in params.conversations]
    return params.model_copy(update={"prompts": [render(tokenizer, template, c) for c in conversations]})
