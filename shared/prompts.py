"""The Stanford Alpaca prompt template, stored with each adapter and applied at serve time."""

from __future__ import annotations

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
TEMPLATE = {"name": "alpaca", "with_input": PROMPT_WITH_INPUT, "no_input": PROMPT_NO_INPUT}


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The prompt for one instruction (and optional input); the response follows it."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)
