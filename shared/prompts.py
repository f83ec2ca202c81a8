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
    return apply_template(TEMPLATE, instruction, input)


def apply_template(template: dict[str, str], instruction: str, input: str = "") -> str:
    """The prompt for an instruction under a stored template (the shape of TEMPLATE)."""
    if input:
        return template["with_input"].format(instruction=instruction, input=input)
    return template["no_input"].format(instruction=instruction)
