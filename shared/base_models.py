"""What the gateway knows of a base model without loading it: its architecture and the module names LoRA can target.

The gateway never imports torch or transformers, so it reads the architecture (`model_type`) from config.json of a
local model directory, or, for a hub id it cannot read offline, from a table of known ids. A model it knows
nothing of is not checked here; the worker then reports a bad name when the job runs.
"""

from __future__ import annotations

import json
from pathlib import Path

# model_type -> module names `target_modules` may hold. peft matches a name against the end of each module's
# dotted path, so both the leaf name and the block-relative one are listed. GPT-2's attention and MLP
# projections are Conv1D layers; the LM head (tied to the embeddings) and the embeddings are left out.
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn", "c_proj", "c_fc", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
}

# Hub ids whose architecture is known without reading them.
KNOWN_HUB_MODELS: dict[str, str] = {
    **dict.fromkeys(("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2"), "gpt2"),
    **{f"openai-community/{name}": "gpt2" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")},
    "distilbert/distilgpt2": "gpt2",
}


def model_type(name: str) -> str | None:
    """The architecture of a base model: config.json's model_type for a local directory, else the table's."""
    config = Path(name) / "config.json"
    try:
        if config.is_file():
            config_values = json.loads(config.read_text(encoding="utf-8"))
            value = config_values.get("model_type") if isinstance(config_values, dict) else None
            return value if isinstance(value, str) else None
    except (OSError, ValueError):
        return None
    return KNOWN_HUB_MODELS.get(name)


def lora_targets(name: str) -> tuple[str, ...] | None:
    """The module names LoRA may target on this base model, or None when the gateway cannot tell."""
    architecture = model_type(name)
    return LORA_TARGETS.get(architecture) if architecture is not None else None
