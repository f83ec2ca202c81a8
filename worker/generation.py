"""Batched generation: many prompts, each with its own sampling settings, in one left-padded batch.

transformers' generate() takes one set of sampling settings and one random generator per call; a
batch here mixes jobs, so this loop samples each row with its own temperature, top-p, stop strings,
token limit and seeded generator. That keeps a seeded prompt's output the same whatever shares its
batch, and a greedy prompt's output the same alone or batched.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch

from shared.job_data import TokenLogprob
from shared.storable import scrub
from worker.logprobs import token_logprob, within
from worker.model_loading import LoadedModel


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: none; k: each token's logprob and the k likeliest (worker/logprobs.py)


@dataclass(frozen=True)
class Request:
    """One prompt to complete."""

    prompt: str
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None  # a loaded peft adapter's name; None runs the base model


@dataclass(frozen=True)
class Generation:
    """What one request produced."""

    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None  # one per token of text, when the request asked for them


class PromptTooLong(ValueError):
    """The prompt plus the tokens asked for do not fit the model's context."""


def encode(loaded: LoadedModel, prompt: str) -> list[int]:
    """Token ids of a prompt, without special tokens."""
    return list(loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"])


def _has_adapters(loaded: LoadedModel) -> bool:
    return hasattr(loaded.model, "peft_config")


def decode(loaded: LoadedModel, ids: list[int]) -> str:
    """The text of generated token ids, as it is stored and streamed: a NUL the model produced (byte 0 is a
    GPT-2 token) becomes U+FFFD, since no database row or JSON reader can hold it (shared.storable)."""
    return scrub(str(loaded.tokenizer.decode(ids)))


def check_fits(loaded: LoadedModel, prompt_ids: Sequence[int], max_new_tokens: int) -> None:
    """Raises PromptTooLong when prompt and completion exceed the context length."""
    if len(prompt_ids) + max_new_tokens > loaded.context_length:
        raise PromptTooLong(
            f"prompt has {len(prompt_ids)} tokens and max_tokens is {max_new_tokens}; "
            f"together they exceed the model's context of {loaded.context_length} tokens"
        )


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else secrets.randbits(63))
    return gen


def _sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """One sampled token (temperature > 0) for one row from its last-position logits [vocab].
    Greedy rows take the batch's argmax instead (generate)."""
    scores = logits.float() / params.temperature
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(torch.softmax(scores, dim=-1), descending=True)
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p  # never the top one
        scores = scores.masked_fill(outside.scatter(0, order, outside), float("-inf"))
    # Gumbel-max: argmax(scores + Gumbel noise) is a draw from softmax(scores). The draw changes only
    # if numeric noise swaps the top two perturbed scores, whose gap is typically of order 1, so a row
    # samples the same tokens alone or batched (an inverse-CDF draw over 50k near-equal boundaries
    # would not).
    uniform = torch.rand(scores.shape, generator=gen, device=scores.device).clamp_(min=1e-20)
    return int(torch.argmax(scores - torch.log(-torch.log(uniform))))


def _cut_at_stop(text: str, stops: Sequence[str]) -> str | None:
    """text up to its first stop string, or None when it holds none."""
    positions = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(positions)] if positions else None


StepListener = Callable[[Sequence[Sequence[int]]], None]


def _decode_attention(loaded: LoadedModel, prefill: str) -> str:
    """The attention kernel for decode steps (a single query position per row).

    On the CPU, PyTorch's SDPA costs more than plain matmul-softmax-matmul for one query position
    (`python bench/decode_attention.py` measures the two side by side). The prompt pass (many positions)
    keeps SDPA, and so does every step on a GPU.
    """
    return "eager" if loaded.device.type == "cpu" and prefill == "sdpa" else prefill


@torch.inference_mode()
def generate(loaded: LoadedModel, requests: Sequence[Request], on_step: StepListener | None = None) -> list[Generation]:
    """Completes every request in one left-padded batch; outputs are in request order.

    Every prompt must fit the context with its max_new_tokens (see check_fits). on_step, if given,
    sees every row's generated token ids after each step (for streaming).
    """
    if not requests:
        return []
    tokenizer, device = loaded.tokenizer, loaded.device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    prompts = [encode(loaded, r.prompt) or [eos] for r in requests]
    for ids, r in zip(prompts, requests, strict=True):
        check_fits(loaded, ids, r.params.max_new_tokens)
    batch, width = len(requests), max(len(p) for p in prompts)

    input_ids = torch.full((batch, width), pad, dtype=torch.long)  # [B, L], padded on the left
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, L]: each row counts from 0

    generators = [_generator(r.params.seed, device) for r in requests]
    generated: list[list[int]] = [[] for _ in requests]
    texts: list[str | None] = [None] * batch  # final text once a row is done
    reasons: list[Literal["stop", "length"]] = ["length"] * batch
    done = [False] * batch
    scored: list[list[TokenLogprob]] = [[] for _ in requests]  # rows that asked for logprobs
    cache = None
    steps = max(r.params.max_new_tokens for r in requests)
    # With adapters loaded the model is a PeftModel, which routes each row to its own adapter.
    per_row = {"adapter_names": [r.adapter or "__base__" for r in requests]} if _has_adapters(loaded) else {}

    greedy_rows = any(r.params.temperature == 0 for r in requests)
    config = loaded.model.config
    prefill_attention = config._attn_implementation
    try:
        for step in range(steps):
            if step == 1:  # one query position per row from here on
                config._attn_implementation = _decode_attention(loaded, prefill_attention)
            out = loaded.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
                **per_row,
            )
            cache = out.cache
            last = out.logits[:, -1, :]  # [B, vocab]
            # One argmax over the batch serves every greedy row (a call per row costs more than the work).
            argmax = last.argmax(dim=-1).tolist() if greedy_rows else []
            next_ids = [pad] * batch
            for row, request in enumerate(requests):
                if done[row]:
                    continue
                if request.params.temperature == 0:
                    token = argmax[row]
                else:
                    token = _sample(last[row], request.params, generators[row])
                next_ids[row] = token
                if token == eos:
                    done[row], reasons[row] = True, "stop"
                    continue
                generated[row].append(token)
                if request.params.logprobs is not None:
                    piece = partial(_piece, loaded)
                    scored[row].append(token_logprob(last[row], token, request.params.logprobs, piece))
                if request.params.stop:
                    cut = _cut_at_stop(decode(loaded, generated[row]), request.params.stop)
                    if cut is not None:
                        done[row], reasons[row], texts[row] = True, "stop", cut
                        continue
                if len(generated[row]) >= request.params.max_new_tokens:
                    done[row] = True
            if on_step is not None:
                on_step(generated)
            if all(done):
                break
            input_ids = torch.tensor(next_ids, dtype=torch.long).unsqueeze(-1).to(device)  # [B, 1]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch, 1))], dim=-1)
            position_ids = position_ids[:, -1:] + 1
    finally:
        config._attn_implementation = prefill_attention

    return [
        Generation(
            text=cut if (cut := texts[row]) is not None else decode(loaded, generated[row]),
            finish_reason=reasons[row],
            prompt_tokens=len(prompts[row]),
            completion_tokens=len(generated[row]),
            logprobs=_logprobs(requests[row], scored[row], texts[row]),
        )
        for row in range(batch)
    ]


def _piece(loaded: LoadedModel, token: int) -> str:
    return decode(loaded, [token])


def _logprobs(request: Request, scored: list[TokenLogprob], cut: str | None) -> list[TokenLogprob] | None:
    """A row's logprob entries, those of text a stop string cut off left out; None when it asked for none."""
    if request.params.logprobs is None:
        return None
    return within(scored, len(cut)) if cut is not None else scored
