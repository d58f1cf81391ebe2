"""Batched decoding that drops each answer from the batch as soon as it ends.

``model.generate`` runs a batch until its longest answer ends, so with answers of very different lengths
(on-policy regeneration: many stop early, many run to the limit) most of a batch's compute goes to rows
that already finished. Removing finished rows from the batch and from the KV cache makes a batch cost what
its live rows cost. Greedy rows are what ``generate`` computes; sampled rows use ``generate``'s warpers
(temperature, then the model's default top-k, then top-p).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from transformers import DynamicCache, LogitsProcessorList, PreTrainedModel
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .target_tap import cache_keyword

# What `generate` samples with when neither the call nor the model's generation config sets top-k.
GENERATE_DEFAULT_TOP_K = 50


def sampling_warpers(
    model: PreTrainedModel, temperature: float | None = None, top_p: float | None = None
) -> LogitsProcessorList:
    """The warpers ``model.generate(do_sample=True, temperature=..., top_p=...)`` applies, in its order."""
    top_k = model.generation_config.top_k
    top_k = GENERATE_DEFAULT_TOP_K if top_k is None else top_k
    warpers = LogitsProcessorList()
    if temperature is not None and temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


@torch.no_grad()
def decode_shrinking_batch(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_ids: Iterable[int],
    do_sample: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    min_new_tokens: int = 0,
    on_finished: Callable[[int, list[int]], None] | None = None,
) -> list[list[int]]:
    """New tokens of each row of a left-padded batch, each ending with its end-of-sequence token unless it
    ran to ``max_new_tokens``. Sampling draws from torch's global generator (seed it to reproduce).
    ``on_finished(row, tokens)`` is called as soon as each row's answer is complete (e.g. to save it)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    warpers = sampling_warpers(model, temperature, top_p) if do_sample else None
    eos = torch.tensor(sorted(set(eos_token_ids)), device=input_ids.device)
    cache = DynamicCache(config=model.config)
    cache_kwarg = cache_keyword(model)
    # Which answer each live row of the batch belongs to; on the batch's device, where the mask that drops
    # finished rows lives.
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    answers: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    tokens, position_ids = input_ids, (attention_mask.cumsum(-1) - 1).clamp(min=0)
    for step in range(max_new_tokens):
        logits = (
            model(
                input_ids=tokens,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                logits_to_keep=1,
                **{cache_kwarg: cache},
            )
            .logits[:, -1]
            .float()
        )
        if step < min_new_tokens:
            logits[:, eos] = float("-inf")
        if warpers is None:
            next_tokens = logits.argmax(-1)
        else:
            scores = warpers(tokens, logits)
            next_tokens = torch.multinomial(scores.softmax(-1), num_samples=1)[:, 0]
        for row, token in zip(rows.tolist(), next_tokens.tolist()):
            answers[row].append(token)
        live = ~torch.isin(next_tokens, eos)
        if on_finished is not None:
            last_step = step == max_new_tokens - 1
            for row in rows[~live if not last_step else slice(None)].tolist():
                on_finished(row, answers[row])
        if not live.any():
            break
        if not live.all():
            keep = live.nonzero()[:, 0]
            cache.batch_select_indices(keep)
            rows, next_tokens, attention_mask = rows[keep], next_tokens[keep], attention_mask[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=-1)
        tokens, position_ids = next_tokens[:, None], attention_mask.sum(-1, keepdim=True) - 1
    return answers
