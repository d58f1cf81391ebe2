"""Drafts from the context: the continuation of the longest recent n-gram match in the prompt and output.

Code and chat answers copy spans of the prompt and of themselves, which an n-gram match finds for free. A
lookup draft is a deterministic function of the sequence, so as a speculative proposal its distribution is
one-hot on the drafted token (`one_hot_logits`): speculative sampling then accepts it with probability p and
resamples from the target's distribution without it, which keeps sampling exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class LookupDraft:
    """A lookup continuation: `tokens` [n] (empty without a match) and the size of the matched n-gram."""

    tokens: torch.Tensor
    ngram: int


def lookup_continuation(
    sequence: torch.Tensor, max_ngram: int, min_ngram: int, num_tokens: int
) -> LookupDraft:
    """The up to `num_tokens` tokens that followed the most recent earlier occurrence of the sequence's last
    n tokens, for the largest n in [min_ngram, max_ngram] that occurs earlier (sequence: [L] token ids).

    One host synchronisation per n tried (to find the match), none per drafted token.
    """
    length = sequence.shape[0]
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        # Windows starting at 0..L-n-1: every earlier occurrence, the suffix itself excluded.
        windows = sequence[:-1].unfold(0, n, 1)
        starts = (windows == sequence[-n:]).all(dim=1).nonzero()
        if starts.numel():
            begin = int(starts[-1]) + n
            return LookupDraft(sequence[begin : begin + num_tokens], n)
    return LookupDraft(sequence[:0], 0)


def one_hot_logits(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits [n, vocab_size] whose softmax is one-hot on each of `tokens` [n]: the distribution of a
    deterministic proposal (0 at the token, -inf elsewhere)."""
    logits = torch.full((tokens.shape[0], vocab_size), -math.inf, device=tokens.device)
    return logits.scatter_(1, tokens.unsqueeze(1), 0.0)


__all__ = ["LookupDraft", "lookup_continuation", "one_hot_logits"]
