"""The LM head of a training step run on the positions that are scored, and nowhere else.

TRL's SFTTrainer patches the model's forward with a fused LM head: ``model(..., fused_lm_head=True)`` returns
per-token log-probabilities (and the entropy and top-1 flags its metrics log) without building the
(batch, length, vocabulary) logits. Its compact form, which projects only the positions whose next-token label
counts, runs where Triton does (CUDA, XPU). Everywhere else it projects every position, prompt and padding
included, in tiles of the vocabulary; its backward projects them all again and accumulates the hidden states'
gradient in fp32. With the loss on completions only, about half the positions are prompt on Alpaca-like data
(bench/train.py's records: 59 prompt and 60 answer tokens on average), so the head does about three times the
matmul work the loss needs, and GPT-2's head (768 x 50,257, tied to the embeddings) holds a third of its weights.

``score_only_labelled_positions`` replaces that forward on such devices: the backbone runs as before, and the
head projects only the positions whose label is not -100, in one matmul under the trainer's autocast (as
transformers' own forward projects every position), with the log-softmax in fp32. The loss, its gradient and the
metrics are the same quantities TRL's head computes, over the same positions (tests/test_training.py pins it).
"""

from __future__ import annotations

import types
from typing import Any

import torch
from transformers import PreTrainedModel
from trl.trainer.utils import FusedCausalLMOutput

# Devices where TRL's fused head already projects the labelled positions only (its Triton kernels).
COMPACT_ALREADY = ("cuda", "xpu")
# Config fields with which TRL's head scales the logits (trl.trainer.utils.add_fused_lm_head reads them): a model
# that sets one to anything but 1, caps its logits or adds a router loss keeps TRL's forward.
LOGIT_SCALES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def score_only_labelled_positions(model: PreTrainedModel, device: torch.device) -> bool:
    """Makes model(..., fused_lm_head=True) project only the labelled positions; False where TRL already does.

    model is the causal LM that TRL patched (under PEFT, ``peft_model.get_base_model()``). What TRL's head does
    beyond a plain causal LM (shifted labels under sequence parallelism, an MoE's router loss, temperature, logit
    scaling) still goes through TRL's forward."""
    if device.type in COMPACT_ALREADY:
        return False
    fused_forward = model.forward
    config = model.config.get_text_config()
    scaled = any(getattr(config, name, None) not in (None, 1.0) for name in LOGIT_SCALES)
    capped = getattr(config, "final_logit_softcapping", None) is not None
    if scaled or capped or getattr(config, "output_router_logits", False):
        return False

    def forward(
        self: PreTrainedModel,
        *args: Any,
        fused_lm_head: bool = False,
        labels: torch.Tensor | None = None,
        shift_labels: torch.Tensor | None = None,
        num_items_in_batch: Any = None,
        **kwargs: Any,
    ) -> Any:
        if not fused_lm_head or labels is None or shift_labels is not None or kwargs.get("output_router_logits"):
            return fused_forward(
                *args,
                fused_lm_head=fused_lm_head,
                labels=labels,
                shift_labels=shift_labels,
                num_items_in_batch=num_items_in_batch,
                **kwargs,
            )
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]  # (batch, length - 1, hidden)
        targets = labels[:, 1:].to(hidden.device)  # (batch, length - 1): the next token at each position
        mask = targets != -100
        return labelled_positions_output(self.get_output_embeddings(), hidden, targets, mask, num_items_in_batch)

    model.forward = types.MethodType(forward, model)
    return True


def labelled_positions_output(
    lm_head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    num_items_in_batch: Any = None,
) -> FusedCausalLMOutput:
    """TRL's fused-head output (zero where mask is False) from the head applied where mask is True only."""
    chosen = targets[mask]  # (n,)
    logits = lm_head(hidden[mask]).float()  # (n, vocabulary): under autocast a bf16 matmul, then fp32
    log_softmax = torch.log_softmax(logits, dim=-1)
    picked = log_softmax.gather(1, chosen.unsqueeze(1)).squeeze(1)  # (n,) log p(label)
    with torch.no_grad():
        entropy = -(log_softmax.exp() * log_softmax).sum(-1)
        is_top1 = logits.argmax(-1) == chosen

    def spread(values: torch.Tensor) -> torch.Tensor:  # (n,) -> (batch, length - 1), zero where not labelled
        return values.new_zeros(mask.shape).masked_scatter(mask, values)

    log_probs = spread(picked)
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedCausalLMOutput(
        loss=-log_probs.sum() / count,
        log_probs=log_probs,
        entropy=spread(entropy),
        is_top1=spread(is_top1),
        label_mask=mask,
    )
