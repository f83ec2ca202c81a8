"""Log probabilities of generated tokens, from the logits the decoding step already computed.

The decoding loop hands one row's last-position logits and the token it chose; this gives that token's
log probability under the model (log-softmax of the raw logits: before temperature and top-p, as OpenAI
reports them) and the top-N tokens at that position. No second forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from shared.job_data import TokenLogprob, TopLogprob

MIN_LOGPROB = -9999.0  # a probability that underflows to 0 (-inf) as a finite number JSON can hold

Piece = Callable[[int], str]  # a token id's text on its own


def _entry(piece: Piece, token: int, logprob: float) -> tuple[str, float, list[int]]:
    text = piece(token)
    return text, max(logprob, MIN_LOGPROB), list(text.encode("utf-8"))


def token_logprob(logits: torch.Tensor, token: int, top_n: int, piece: Piece) -> TokenLogprob:
    """The chosen token's entry, with the top_n likeliest tokens at its position (logits: [vocab])."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [vocab]
    text, value, raw = _entry(piece, token, float(logprobs[token]))
    top: list[TopLogprob] = []
    if top_n > 0:
        values, ids = torch.topk(logprobs, min(top_n, logprobs.shape[-1]))
        for v, i in zip(values.tolist(), ids.tolist(), strict=True):
            t, lp, b = _entry(piece, int(i), float(v))
            top.append(TopLogprob(token=t, logprob=lp, bytes=b))
    return TokenLogprob(token=text, logprob=value, bytes=raw, top_logprobs=top)


def within(entries: Sequence[TokenLogprob], length: int) -> list[TokenLogprob]:
    """The entries whose tokens lie in the first `length` characters of the text (a stop string cut the rest)."""
    kept: list[TokenLogprob] = []
    used = 0
    for entry in entries:
        if used >= length:
            break
        kept.append(entry)
        used += len(entry.token)
    return kept
