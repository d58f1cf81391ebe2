"""Frequency-ranked draft sub-vocabularies (FR-Spec style).

Most of a drafter's cost on CPU is the projection onto the vocabulary (the LM head and every Markov step).
Drafting only among the K most frequent tokens of the target's own outputs cuts that cost by V / K, while the
target's verification stays untouched: the draft distribution is simply zero outside the subset, so greedy
and sampled outputs remain exactly the target's.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

# Token ids of the reference target's tokenizer ranked by frequency over a broad corpus (see README there).
REFERENCE_TOKEN_RANKING = "smollm2_token_ranking.json.gz"


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


def rank_tokens(
    texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, show_progress: bool = True
) -> dict[str, Any]:
    """Count the tokens of `texts`: {"ids": [...], "counts": [...]}, most frequent first (ties by id).

    A ranking over a broad corpus (chat, code, maths) gives a draft vocabulary that does not cap acceptance
    on domains the training answers miss; `ranked_vocab(load_token_ranking(), size)` turn it into one.
    """
    counts: Counter[int] = Counter()
    for text in tqdm(texts, desc="Counting tokens", unit="text", disable=not show_progress):
        counts.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return {"ids": [t for t, _ in ranked], "counts": [c for _, c in ranked]}


def load_token_ranking(name: str = REFERENCE_TOKEN_RANKING) -> dict[str, Any]:
    """A vendored token ranking (`rank_tokens` output plus its provenance) from `dspark_hf/resources`."""
    with resources.files("dspark_hf").joinpath("resources", name).open("rb") as f:
        return json.loads(gzip.decompress(f.read()))


def ranked_vocab(ranking: dict[str, Any], size: int, always_include: Iterable[int] = ()) -> torch.LongTensor:
    """The `size` top-ranked ids of a token ranking plus `always_include`, sorted (for `set_draft_vocab`)."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}.")
    forced = set(always_include)
    chosen = forced | set([t for t in ranking["ids"] if t not in forced][: max(size - len(forced), 0)])
    return torch.tensor(sorted(chosen), dtype=torch.long)


def vocab_coverage(vocab_ids: torch.Tensor | None, token_ids: Sequence[int]) -> float:
    """Share of `token_ids` (e.g. a target's generated tokens) inside `vocab_ids` (1.0 for the full
    vocabulary)."""
    if vocab_ids is None:
        return 1.0
    if len(token_ids) == 0:
        return float("nan")
    inside = torch.isin(torch.as_tensor(list(token_ids), dtype=torch.long), vocab_ids.cpu())
    return float(inside.float().mean())


__all__ = [
    "frequency_ranked_vocab",
    "load_token_ranking",
    "rank_tokens",
    "ranked_vocab",
    "vocab_coverage",
]
