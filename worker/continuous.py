"""Iteration-level (continuous) batching: rows join a running batch at a step boundary and leave when done.

A static batch (worker.generation.generate) runs until its longest row ends: a 16-token row waits for a
512-token neighbour, and a prompt that arrives meanwhile waits for the whole batch. Here the batch is a
set of rows that changes between decoding steps. A row that joins is prefilled on its own (its prompt in
one forward pass, which also samples its first token); its KV cache is then padded on the left to the
batch's width and appended, so every row's latest token stays in the last column. A row that ends is
dropped from the cache at once, and columns that no remaining row uses are trimmed from the left.

Every row samples with its own seeded generator and the same per-row rules as generate() (Gumbel-max
sampling, stop strings, token limit), so a seeded row draws the same tokens whatever joins or leaves its
batch, and a greedy row writes what it writes alone.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F

from shared.job_data import TokenLogprob
from worker.generation import (
    Generation,
    Request,
    _cut_at_stop,
    _decode_attention,
    _generator,
    _has_adapters,
    _logprobs,
    _piece,
    _sample,
    check_fits,
    decode,
    encode,
)
from worker.grouped_lora import GroupedLora
from worker.logprobs import token_logprob
from worker.model_loading import LoadedModel


@dataclass(eq=False)
class Row:
    """One request in a running batch: what it generated so far and whether it has ended."""

    key: Hashable  # whose row this is (the scheduler uses (job id, output index))
    request: Request
    prompt_ids: list[int]
    generator: torch.Generator
    generated: list[int] = field(default_factory=list)
    done: bool = False
    finish_reason: Literal["stop", "length"] = "length"
    cut_text: str | None = None  # the text up to a stop string, once one appeared
    scored: list[TokenLogprob] = field(default_factory=list)  # when the request asked for logprobs

    def generation(self, loaded: LoadedModel) -> Generation:
        """What the row produced, as generate() reports it."""
        return Generation(
            text=self.cut_text if self.cut_text is not None else decode(loaded, self.generated),
            finish_reason=self.finish_reason,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.generated),
            logprobs=_logprobs(self.request, self.scored, self.cut_text),
        )


def new_row(loaded: LoadedModel, key: Hashable, request: Request) -> Row:
    """A row ready to join a batch; PromptTooLong when it does not fit the context."""
    tokenizer = loaded.tokenizer
    prompt_ids = encode(loaded, request.prompt) or [tokenizer.eos_token_id]
    check_fits(loaded, prompt_ids, request.params.max_new_tokens)
    return Row(key, request, prompt_ids, _generator(request.params.seed, loaded.device))


class RunningBatch:
    """The rows decoding together now, with their KV cache: admit() rows, step() them, take_finished().

    Rows are kept grouped by adapter (a contiguous run of rows per adapter), so that each adapter's LoRA
    product runs on its own rows only (worker.grouped_lora).
    """

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.rows: list[Row] = []
        self.cache: Any = None  # transformers DynamicCache; its layers hold keys/values [B, heads, T, head_dim]
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=loaded.device)  # [B, T]: 1 where a row has a token
        self.positions = torch.zeros((0,), dtype=torch.long, device=loaded.device)  # [B]: next position id
        self.next_ids = torch.zeros((0,), dtype=torch.long, device=loaded.device)  # [B]: token each row feeds next
        self._ended: list[Row] = []  # rows that ended and left the batch, until take_finished()
        self.paused: RunningBatch | None = None  # rows taken out of the decoding by pause(), with their KV cache

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        """Columns of the KV cache (the longest row's prompt plus what it generated, plus left padding)."""
        return int(self.mask.shape[1])

    @torch.inference_mode()
    def admit(self, rows: Sequence[Row]) -> None:
        """Prefills the rows' prompts (one forward pass), samples their first tokens, and adds them to the batch.

        A failure here leaves the running rows as they were: the newcomers are prefilled on their own cache.
        """
        if not rows:
            return
        rows = sorted(rows, key=_adapter_of)
        loaded, device = self.loaded, self.loaded.device
        pad = (
            loaded.tokenizer.pad_token_id
            if loaded.tokenizer.pad_token_id is not None
            else loaded.tokenizer.eos_token_id
        )
        width = max(len(r.prompt_ids) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # [b, W], padded on the left
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row.prompt_ids) :] = torch.tensor(row.prompt_ids)
            mask[i, width - len(row.prompt_ids) :] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # [b, W]: each row counts from 0
        with self._attention(decoding=False):
            out = self._forward(rows, input_ids, mask, position_ids, cache=None)
        next_ids = self._advance(rows, out.logits[:, -1, :])
        self._merge(rows, out.cache, mask, position_ids[:, -1] + 1, next_ids)
        self._retire()

    @torch.inference_mode()
    def step(self) -> None:
        """One decoding step: every running row feeds its last token and samples its next one."""
        if not self.rows:
            return
        ones = self.mask.new_ones((len(self.rows), 1))
        self.mask = torch.cat([self.mask, ones], dim=-1)  # [B, T + 1]
        with self._attention(decoding=True):
            out = self._forward(
                self.rows, self.next_ids.unsqueeze(-1), self.mask, self.positions.unsqueeze(-1), cache=self.cache
            )
        self.cache = out.cache
        self.positions = self.positions + 1
        self.next_ids = self._advance(self.rows, out.logits[:, -1, :])
        self._retire()

    def take_finished(self) -> list[Row]:
        """The rows that ended (and left the batch) since the last call."""
        ended, self._ended = self._ended, []
        return ended

    def _retire(self) -> None:
        self._ended += self.remove(lambda row: row.done)

    def remove(self, which: Any) -> list[Row]:
        """Removes the rows (paused ones too) for which which(row) is true (they leave before the next step) and
        gives them back."""
        leaving = self.paused.remove(which) if self.paused is not None else []
        if self.paused is not None and not self.paused.rows:
            self.paused = None
        if any(which(row) for row in self.rows):
            leaving += [row for row in self.rows if which(row)]
            self._keep([i for i, row in enumerate(self.rows) if not which(row)])
        return leaving

    def clear(self) -> list[Row]:
        """Removes every row, paused ones too (after a failed step, whose cache may be half updated), and gives
        them back."""
        rows = self.rows + (self.paused.rows if self.paused is not None else [])
        self._keep([])
        self.paused = None
        return rows

    def pause(self, which: Any) -> None:
        """Takes the rows for which which(row) is true out of the steps that follow, keeping their KV cache aside,
        until resume(). A paused row draws the same tokens as if it had not paused: it keeps its generator, its
        positions and its cache; it only waits."""
        indices = [i for i, row in enumerate(self.rows) if which(row)]
        if not indices:
            return
        part = self._take(indices)
        if self.paused is None:
            self.paused = part
        else:
            self.paused._absorb(part)

    def resume(self, which: Any) -> None:
        """Puts the paused rows for which which(row) is true back into the steps that follow."""
        if self.paused is None:
            return
        indices = [i for i, row in enumerate(self.paused.rows) if which(row)]
        if not indices:
            return
        self._absorb(self.paused._take(indices))
        if not self.paused.rows:
            self.paused = None

    def _take(self, indices: list[int]) -> RunningBatch:
        """Removes these rows from the batch and gives them back as a batch of their own (their cache columns)."""
        part = RunningBatch(self.loaded)
        part.rows, part.mask, part.positions, part.next_ids = list(self.rows), self.mask, self.positions, self.next_ids
        part.cache = copy.copy(self.cache)
        part.cache.layers = [copy.copy(layer) for layer in self.cache.layers]  # _keep replaces their tensors
        part._keep(indices)
        self._keep([i for i in range(len(self.rows)) if i not in set(indices)])
        return part

    def _absorb(self, part: RunningBatch) -> None:
        """Appends another batch's rows, with their cache, to this one."""
        if part.rows:
            self._merge(part.rows, part.cache, part.mask, part.positions, part.next_ids)

    # What follows is the batch's bookkeeping: the forward pass, sampling, and the cache's rows and columns.

    def _forward(self, rows: Sequence[Row], input_ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor,
                 cache: Any) -> Any:  # fmt: skip
        model = self.loaded.model  # a PeftModel once an adapter is loaded (worker.adapters)
        adapters = [_adapter_of(r) for r in rows]
        grouped = GroupedLora.of(model) if _has_adapters(self.loaded) else None
        kwargs: dict[str, Any] = {}
        if grouped is not None and not grouped.applies(adapters):
            kwargs["adapter_names"] = adapters  # peft's own mixed batch (an adapter that is not plain LoRA)
        lora = grouped.segments(adapters) if grouped is not None and not kwargs else nullcontext()
        with lora:
            return model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
                **kwargs,
            )

    @contextmanager
    def _attention(self, decoding: bool) -> Any:
        config = self.loaded.model.config
        prefill = config._attn_implementation
        if decoding:
            config._attn_implementation = _decode_attention(self.loaded, prefill)
        try:
            yield
        finally:
            config._attn_implementation = prefill

    def _advance(self, rows: Sequence[Row], last: torch.Tensor) -> torch.Tensor:
        """Samples each row's next token from its last-position logits [B, vocab]; marks rows that end.
        The tokens each row feeds at the next step ([B])."""
        eos = self.loaded.tokenizer.eos_token_id
        # One argmax over the batch serves every greedy row (a call per row costs more than the work).
        argmax = last.argmax(dim=-1).tolist() if any(r.request.params.temperature == 0 for r in rows) else []
        tokens = []
        for i, row in enumerate(rows):
            params = row.request.params
            token = argmax[i] if params.temperature == 0 else _sample(last[i], params, row.generator)
            tokens.append(token)
            if token == eos:
                row.done, row.finish_reason = True, "stop"
                continue
            row.generated.append(token)
            if params.logprobs is not None:
                row.scored.append(token_logprob(last[i], token, params.logprobs, partial(_piece, self.loaded)))
            if params.stop:
                cut = _cut_at_stop(decode(self.loaded, row.generated), params.stop)
                if cut is not None:
                    row.done, row.finish_reason, row.cut_text = True, "stop", cut
                    continue
            if len(row.generated) >= params.max_new_tokens:
                row.done = True
        return torch.tensor(tokens, dtype=torch.long, device=self.loaded.device)

    def _merge(self, rows: Sequence[Row], cache: Any, mask: torch.Tensor, positions: torch.Tensor,
               next_ids: torch.Tensor) -> None:  # fmt: skip
        """Appends prefilled rows (their cache, mask [b, W], positions [b], next tokens [b]) to the batch,
        left-padding whichever side is narrower, then puts the rows back in adapter order."""
        if not self.rows:
            self.rows, self.cache, self.mask, self.positions, self.next_ids = (
                list(rows),
                cache,
                mask,
                positions,
                next_ids,
            )
        else:
            width = max(self.width, int(mask.shape[1]))
            for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
                mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
                mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])
            self.mask = torch.cat([F.pad(self.mask, (width - self.width, 0)), F.pad(mask, (width - mask.shape[1], 0))])
            self.rows += rows
            self.positions = torch.cat([self.positions, positions])
            self.next_ids = torch.cat([self.next_ids, next_ids])
        order = sorted(range(len(self.rows)), key=lambda i: _adapter_of(self.rows[i]))
        if order != list(range(len(self.rows))):
            self._keep(order)

    def _keep(self, indices: list[int]) -> None:
        """Keeps these rows, in this order, and trims cache columns no kept row uses."""
        self.rows = [self.rows[i] for i in indices]
        index = torch.tensor(indices, dtype=torch.long, device=self.loaded.device)
        self.mask = self.mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        self.next_ids = self.next_ids.index_select(0, index)
        if not indices:
            self.cache, self.mask = None, self.mask[:, :0]
            return
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else self.width
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:, :]
            layer.values = layer.values.index_select(0, index)[:, :, first:, :]


def _adapter_of(row: Row) -> str:
    return row.request.adapter or "__base__"


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """t [B, heads, T, head_dim] with zeros before its T columns up to width."""
    return F.pad(t, (0, 0, width - t.shape[2], 0)) if t.shape[2] < width else t


def generate_continuously(loaded: LoadedModel, requests: Sequence[Request]) -> list[Generation]:
    """Completes the requests as one running batch whose rows leave as they end; outputs in request order.

    The in-process equivalent of generate() on the continuous engine (benchmarks and tests compare the two).
    """
    batch = RunningBatch(loaded)
    rows = [new_row(loaded, i, r) for i, r in enumerate(requests)]
    batch.admit(rows)
    while len(batch):
        batch.step()
    return [row.generation(loaded) for row in rows]
