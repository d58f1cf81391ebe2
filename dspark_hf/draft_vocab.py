"""Frequency-ranked draft sub-vocabularies (FR-Spec style).

Most of a drafter's cost on CPU is the projection onto the vocabulary (the LM head and every Markov step).
Drafting only among the K most frequent tokens of the target's own outputs cuts that cost by V / K, while the
target's verification stays untouched: the draft distribution is simply zero outside the subset, so greedy
and sampled outputs remain exactly the target's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import torch


def frequency_ranked_vocab(
    sequences: Iterable[Sequence[int]],
    size: int,
    loss_masks: Iterable[Sequence[int]] | None = None,
    always_include: Iterable[int] = (),
) -> torch.LongTensor:
    """The `size` most frequent token ids of `sequences` (only where `loss_masks` is 1, when given), plus
    `always_include` (e.g. EOS), as a sorted tensor ready for `DSparkForCausalLM.set_draft_vocab`."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}.")
    counts: Counter[int] = Counter()
    masks = iter(loss_masks) if loss_masks is not None else None
    for ids in sequences:
        if masks is None:
            counts.update(ids)
        else:
            counts.update(t for t, m in zip(ids, next(masks)) if m)
    forced = set(always_include)
    ranked = [token for token, _ in counts.most_common() if token not in forced]
    chosen = sorted(forced | set(ranked[: max(size - len(forced), 0)]))
    return torch.tensor(chosen, dtype=torch.long)


__all__ = ["frequency_ranked_vocab"]
