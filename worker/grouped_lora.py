"""Grouped LoRA: in a batch whose rows are ordered by adapter, each adapter's LoRA product runs on its own
contiguous rows only (the segmented idea of Punica and S-LoRA, in plain torch).

peft's mixed batch (`adapter_names=`) builds index lists for every adapter in every LoRA layer at every
forward pass, gathers those rows, and scatters the products back; with several adapters in a batch that
bookkeeping, not the arithmetic, is what costs. Here the running batch (worker.continuous) keeps its rows
sorted by adapter, peft's own LoRA path is switched off for the pass, and a forward hook on each LoRA layer
adds `lora_B(lora_A(x[a:b])) * scaling` to the slice `[a:b]` of the base layer's output: views, no gathers.

Only plain LoRA on linear layers is grouped; a batch naming an adapter with a peft variant (DoRA, aLoRA)
or a LoRA embedding keeps peft's mixed batch (applies() says which).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.lora import LoraLayer

BASE = "__base__"

# A run of rows on one adapter: (adapter name, first row, one past the last row).
Segment = tuple[str, int, int]


def segments(adapters: Sequence[str]) -> list[Segment]:
    """The contiguous runs of equal adapter names, in order (rows sorted by adapter give one run each)."""
    runs: list[Segment] = []
    for i, name in enumerate(adapters):
        if runs and runs[-1][0] == name:
            runs[-1] = (name, runs[-1][1], i + 1)
        else:
            runs.append((name, i, i + 1))
    return runs


class GroupedLora:
    """The LoRA hooks of one peft model; segments() is the context in which a forward pass uses them."""

    def __init__(self) -> None:
        self._layers: list[Any] = []  # peft LoRA layers, each with a forward hook from this object
        self._hooked: set[int] = set()
        self._plain: set[str] = set()  # adapters every hooked layer can apply as plain LoRA
        self._key: tuple[str, ...] = ()
        self._segments: list[Segment] | None = None

    @classmethod
    def of(cls, model: Any) -> GroupedLora:
        """The hooks of this peft model (installed on first use, refreshed when its adapters change)."""
        grouped = model.__dict__.get("_llmq_grouped_lora")
        if grouped is None:
            grouped = cls()
            model.__dict__["_llmq_grouped_lora"] = grouped
        grouped._refresh(model)
        return grouped

    def applies(self, adapters: Sequence[str]) -> bool:
        """Whether every adapter named (BASE aside) can be applied here; if not, use peft's mixed batch."""
        return all(name == BASE or name in self._plain for name in adapters)

    @contextmanager
    def segments(self, adapters: Sequence[str]) -> Iterator[None]:
        """Within the block, a forward pass applies each adapter to its own rows (adapters: one name a row,
        equal names contiguous) and peft's own LoRA path is off."""
        self._segments = [s for s in segments(adapters) if s[0] != BASE]
        for layer in self._layers:
            layer._disable_adapters = True
        try:
            yield
        finally:
            self._segments = None
            for layer in self._layers:
                layer._disable_adapters = False

    def _refresh(self, model: Any) -> None:
        key = tuple(sorted(model.peft_config))
        if key == self._key:
            return
        self._key = key
        for module in model.modules():
            if isinstance(module, LoraLayer) and isinstance(module, torch.nn.Module) and id(module) not in self._hooked:
                module.register_forward_hook(self._hook)
                self._hooked.add(id(module))
                self._layers.append(module)
        live = {id(m) for m in model.modules()}
        self._layers = [layer for layer in self._layers if id(layer) in live]
        self._plain = {
            name
            for name in key
            if all(
                name not in layer.lora_variant and name not in getattr(layer, "lora_embedding_A", {})
                for layer in self._layers
            )
        }

    def _hook(self, module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        if not self._segments:
            return output
        x = args[0]  # [B, T, in_features]
        if not output.is_contiguous():
            output = output.contiguous()
        per_row = x[0].numel() // x.shape[-1]  # tokens a row holds (T, or 1 for 2-D input)
        flat_x, flat_out = x.reshape(-1, x.shape[-1]), output.view(-1, output.shape[-1])
        for name, start, end in self._segments:
            if name not in module.lora_A:
                continue  # this adapter does not touch this layer
            # The slice of the flattened rows is a view; the product goes straight into the output with one addmm,
            # the scaling as its alpha: no module calls, no temporaries beyond the rank-r one.
            w_a, w_b = module.lora_A[name].weight, module.lora_B[name].weight  # [r, in], [out, r]
            rows = flat_x[start * per_row : end * per_row]
            low = torch.mm(rows if rows.dtype == w_a.dtype else rows.to(w_a.dtype), w_a.t())  # [n, r]
            target = flat_out[start * per_row : end * per_row]
            if target.dtype == w_b.dtype:
                target.addmm_(low, w_b.t(), alpha=module.scaling[name])
            else:
                target.add_(torch.mm(low, w_b.t()).to(target.dtype), alpha=module.scaling[name])
        return output
