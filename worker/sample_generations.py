"""A finished fine-tune's greedy answers to a few held-out validation prompts, beside the base model's.

After the last step the train worker asks the trained model (adapter on) and the base (adapter off, the same
weights in memory) the first `fine_tune_samples` validation prompts, rendered with the job's chat template
exactly as they were trained, greedily and at most `fine_tune_sample_tokens` new tokens each. The answers are
stored on the job (shared.job_data.SampleGeneration) for its page, the API and `llmq status`: a quick look at
what the fine-tune changed, next to the validation loss. Cheap by construction (a handful of short greedy
decodes on a model already loaded) and never a reason to fail the job: an error leaves no samples.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from shared.alpaca import Record, is_prompt_completion
from shared.job_data import SampleGeneration
from worker.chat_data import as_conversation
from worker.chat_rendering import render

log = logging.getLogger(__name__)


def sample_generations(
    model: Any, tokenizer: Any, records: Sequence[Record], template: str, *, count: int, max_tokens: int,
    max_prompt_tokens: int,
) -> list[SampleGeneration]:  # fmt: skip
    """Greedy answers of the trained peft model and of its base to the first count records; [] when count is 0,
    there is no validation record, or generating fails (logged)."""
    chosen = list(records[:count])
    if not chosen:
        return []
    try:
        return [_sample(model, tokenizer, record, template, max_tokens, max_prompt_tokens) for record in chosen]
    except Exception:
        log.warning("sample generations failed; the job succeeds without them", exc_info=True)
        return []


def _sample(
    model: Any, tokenizer: Any, record: Record, template: str, max_tokens: int, max_prompt_tokens: int
) -> SampleGeneration:
    prompt, shown, reference = _prompt(record, tokenizer, template)
    fine_tuned = greedy(model, tokenizer, prompt, max_tokens, max_prompt_tokens)
    disable = getattr(model, "disable_adapter", None)
    base = None
    if disable is not None:
        with disable():
            base = greedy(model, tokenizer, prompt, max_tokens, max_prompt_tokens)
    return SampleGeneration(prompt=shown, reference=reference, fine_tuned=fine_tuned, base=base)


def _prompt(record: Record, tokenizer: Any, template: str) -> tuple[str, str, str | None]:
    """(the text the model is given, the prompt as people read it, the record's own answer or None)."""
    if is_prompt_completion(record):
        return record["prompt"], record["prompt"], record.get("completion")
    turns = as_conversation(record)
    reference = None
    if turns[-1]["role"] == "assistant":
        reference = turns[-1]["content"]
        turns = turns[:-1]
    users = [t for t in turns if t["role"] == "user"]
    shown = "\n".join(part for t in users[-1:] for part in (t["content"], t.get("input", "")) if part)
    return render(tokenizer, template, turns), shown, reference


@torch.no_grad()
def greedy(model: Any, tokenizer: Any, prompt: str, max_tokens: int, max_prompt_tokens: int) -> str:
    """The model's greedy continuation of prompt (its last max_prompt_tokens tokens), up to EOS or max_tokens."""
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"][:, -max_prompt_tokens:]
    ids = ids.to(next(model.parameters()).device)  # [1, prompt tokens]
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            use_cache=True,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )  # [1, prompt + new tokens]
    finally:
        model.train(was_training)
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)).strip()
