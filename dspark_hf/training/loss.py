"""The DSpark training objective: cross-entropy, L1 distance to the target distribution, and confidence BCE.

The L1 term is twice the total variation between the draft and target distributions; 1 - L1/2 is the
probability that speculative sampling accepts a draft token, which is also the confidence head's target.
The vocabulary-sized work (softmax, L1, their gradients) runs over chunks of rows, so the float32 temporaries
never hold anchors x block x vocab values at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

# Logit values per float32 temporary of one chunk (64 MB); rows per chunk = this // vocab size.
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class DSparkLossOutput(ModelOutput):
    """Result of [`dspark_loss`].

    loss: scalar `ce_weight * ce_loss + l1_weight * l1_loss + confidence_weight * confidence_loss`.
    ce_loss, l1_loss: scalar terms, each a position-weighted mean over the valid positions.
    confidence_loss: scalar BCE of the confidence logits against the acceptance (None without confidence
        logits).
    weight_sum: scalar sum of the position weights over valid positions, the normaliser of every term;
        multiply a term by it to get its weighted sum (e.g. to renormalise over batches or processes).
    acceptance: [block] mean acceptance `1 - 0.5 * ||p_d - p_t||_1` of each block position over its valid
        positions (NaN where a position has none).
    position_count: [block] number of valid positions per block position.
    token_acceptance: [..., block] acceptance of every position (detached; meaningful where `loss_mask` is
        set).
    """

    loss: torch.Tensor | None = None
    ce_loss: torch.Tensor | None = None
    l1_loss: torch.Tensor | None = None
    confidence_loss: torch.Tensor | None = None
    weight_sum: torch.Tensor | None = None
    acceptance: torch.Tensor | None = None
    position_count: torch.Tensor | None = None
    token_acceptance: torch.Tensor | None = None


class _ChunkedDistributionTerms(torch.autograd.Function):
    """Per-row cross-entropy and L1 distance between softmax(draft) and the target distribution, in chunks.

    Rows cover K ids (the full vocabulary or a draft vocabulary); `outside` is the target mass on ids beyond
    them, a constant of L1. Labels are indices into the K ids, -1 where the label lies outside (no CE). Only
    the inputs are kept for backward; each chunk's probabilities are recomputed there and its gradient
    written straight into one buffer of the logits' shape. Target values are constants. With `target_rows`,
    row r's target is `target_probs[target_rows[r]]`, gathered chunk by chunk (overlapping blocks share
    target rows, which are then stored once).
    """

    @staticmethod
    def forward(ctx, draft_logits, target_probs, target_rows, outside, labels, rows_per_chunk: int):
        dtype = torch.promote_types(draft_logits.dtype, torch.float32)
        num_rows = draft_logits.shape[0]
        ce = draft_logits.new_empty(num_rows, dtype=dtype)
        l1 = draft_logits.new_empty(num_rows, dtype=dtype)
        has_label = labels >= 0
        for start in range(0, num_rows, rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            log_probs = torch.log_softmax(draft_logits[rows].to(dtype), dim=-1)
            label_log_probs = log_probs.gather(-1, labels[rows, None].clamp_min(0)).squeeze(-1)
            ce[rows] = torch.where(has_label[rows], -label_log_probs, 0.0)
            distance = log_probs.exp_().sub_(_target_chunk(target_probs, target_rows, rows))
            l1[rows] = torch.linalg.vector_norm(distance, ord=1, dim=-1) + outside[rows]
        ctx.save_for_backward(draft_logits, target_probs, target_rows, labels)
        ctx.rows_per_chunk = rows_per_chunk
        return ce, l1

    @staticmethod
    def backward(ctx, grad_ce, grad_l1):
        draft_logits, target_probs, target_rows, labels = ctx.saved_tensors
        dtype = grad_ce.dtype
        grad = torch.empty_like(draft_logits)
        grad_ce = grad_ce * (labels >= 0)
        for start in range(0, draft_logits.shape[0], ctx.rows_per_chunk):
            rows = slice(start, start + ctx.rows_per_chunk)
            probs = torch.softmax(draft_logits[rows].to(dtype), dim=-1)
            # d CE / dz = p - onehot(y);  d L1 / dz_j = p_j * (s_j - sum_v s_v p_v) with s = sign(p - p_t);
            # together p * (g_l1 * s + g_ce - g_l1 * s.p) - g_ce * onehot(y), built in place in one buffer.
            chunk_grad = torch.sub(probs, _target_chunk(target_probs, target_rows, rows)).sign_()
            signed_mass = torch.linalg.vecdot(chunk_grad, probs)
            g_l1 = grad_l1[rows, None]
            chunk_grad.mul_(g_l1).add_(grad_ce[rows, None] - g_l1 * signed_mass[:, None]).mul_(probs)
            chunk_grad.scatter_add_(-1, labels[rows, None].clamp_min(0), -grad_ce[rows, None])
            grad[rows] = chunk_grad
        return grad, None, None, None, None, None


def _target_chunk(target_probs: torch.Tensor, target_rows: torch.Tensor | None, rows: slice) -> torch.Tensor:
    """The target probabilities of the draft rows `rows`."""
    return target_probs[rows] if target_rows is None else target_probs[target_rows[rows]]


def target_distribution(
    target_logits: torch.Tensor, vocab_ids: torch.Tensor | None = None, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(target_logits) [..., V] at `vocab_ids` ([..., K]; all ids when None), and the mass outside
    them [...], in float32 and in row chunks."""
    vocab_size = target_logits.shape[-1]
    rows = target_logits.detach().reshape(-1, vocab_size)
    width = vocab_size if vocab_ids is None else vocab_ids.numel()
    probs = rows.new_empty(rows.shape[0], width, dtype=torch.float32)
    rows_per_chunk = chunk_size or max(1, _CHUNK_ELEMENTS // vocab_size)
    for start in range(0, rows.shape[0], rows_per_chunk):
        chunk = torch.softmax(rows[start : start + rows_per_chunk].float(), dim=-1)
        probs[start : start + rows_per_chunk] = chunk if vocab_ids is None else chunk[:, vocab_ids]
    outside = (1.0 - probs.sum(-1)).clamp_min(0.0) if vocab_ids is not None else probs.new_zeros(len(probs))
    return probs.view(*target_logits.shape[:-1], width), outside.view(target_logits.shape[:-1])


def position_weights(block_size: int, decay_gamma: float, device: torch.device | None = None) -> torch.Tensor:
    """exp(-k / decay_gamma) for 0-based block positions k: early positions matter most, since a rejection
    ends the block."""
    if not decay_gamma > 0:
        raise ValueError(f"decay_gamma must be > 0, got {decay_gamma}.")
    return torch.exp(-torch.arange(block_size, device=device, dtype=torch.float32) / decay_gamma)


def dspark_loss(
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor | None,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    confidence_logits: torch.Tensor | None = None,
    *,
    vocab_ids: torch.Tensor | None = None,
    target_probs: torch.Tensor | None = None,
    target_outside_mass: torch.Tensor | None = None,
    target_rows: torch.Tensor | None = None,
    ce_weight: float = 0.1,
    l1_weight: float = 0.9,
    confidence_weight: float = 1.0,
    decay_gamma: float = 4.0,
    chunk_size: int | None = None,
) -> DSparkLossOutput:
    r"""
    The DSpark loss over blocks of drafted positions (DSpark paper, section 5; DeepSpec's defaults).

    Args:
        draft_logits: [..., block, K] drafter logits (after the Markov bias) over `vocab_ids`, or over the
            full vocabulary (K = V) when `vocab_ids` is None.
        target_logits: [..., block, V] target logits at the same positions over the full vocabulary; treated
            as a constant. May be None when `target_probs` is given.
        labels: [..., block] ground-truth next tokens (ids of the full vocabulary).
        loss_mask: [..., block] bool, True on supervised positions; already cut at the first invalid label of
            each block (the terms only read it, positions after a hole are not dropped here).
        confidence_logits: [..., block] pre-sigmoid confidence, trained towards the detached acceptance.
        vocab_ids: [K] sorted, distinct token ids that the drafter can draft (a draft vocabulary), or None.
        target_probs, target_outside_mass: instead of `target_logits`, the target's probabilities at
            `vocab_ids` [..., block, K] and its mass outside them [..., block] (see `target_distribution`).
        target_rows: [..., block] with `target_probs` [N, K] and `target_outside_mass` [N]: position i's
            target is row `target_rows[i]`. Overlapping blocks share their targets, so N distinct rows stand
            for all positions and no [positions, K] float32 target tensor is built.
        ce_weight, l1_weight, confidence_weight: weights of the three terms.
        decay_gamma: position k (0-based) weighs exp(-k / decay_gamma).
        chunk_size: rows (block positions) per chunk of the vocabulary computation; by default about 16M
            logits per chunk.

    Training over a draft vocabulary S (as EAGLE-3 / FR-Spec do): the drafter puts no mass outside S, so

        L1 = sum_{v in S} |p_d(v) - p_t(v)| + sum_{v not in S} p_t(v)
           = sum_{v in S} |p_d(v) - p_t(v)| + m_out,

    with p_d = softmax over S only and p_t the target's full-vocabulary distribution at S. The outside mass
    m_out is a constant of the drafter, so it moves the value (and the acceptance 1 - L1/2, which stays the
    exact speculative-sampling acceptance of the restricted drafter) but not the gradient. A label outside S
    cannot be drafted and gives no cross-entropy. With S the whole vocabulary this is the full loss exactly.

    All math runs in (at least) float32. Each term is normalised by the sum of the position weights over the
    valid positions; a batch without valid positions gives zero terms.
    """
    block_size = draft_logits.shape[-2]
    target_probs, target_outside_mass = _target_terms(
        draft_logits, target_logits, vocab_ids, target_probs, target_outside_mass, target_rows, chunk_size
    )
    _check_position_shapes(
        draft_logits,
        labels=labels,
        loss_mask=loss_mask,
        confidence_logits=confidence_logits,
        target_outside_mass=target_outside_mass if target_rows is None else None,
        target_rows=target_rows,
    )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    mask = loss_mask.bool()
    weights = position_weights(block_size, decay_gamma, draft_logits.device) * mask
    weight_sum = weights.sum()
    denominator = weight_sum.clamp_min(torch.finfo(torch.float32).tiny)

    ce, l1 = _distribution_terms(
        draft_logits,
        target_probs,
        target_outside_mass,
        target_rows,
        labels.masked_fill(~mask, 0),
        vocab_ids,
        chunk_size,
    )
    ce_loss = (ce * weights).sum() / denominator
    l1_loss = (l1 * weights).sum() / denominator
    loss = ce_weight * ce_loss + l1_weight * l1_loss

    token_acceptance = (1.0 - 0.5 * l1.detach()).clamp(0.0, 1.0)
    confidence_loss = None
    if confidence_logits is not None:
        bce = F.binary_cross_entropy_with_logits(
            confidence_logits.to(token_acceptance.dtype), token_acceptance, reduction="none"
        )
        confidence_loss = (bce * weights).sum() / denominator
        loss = loss + confidence_weight * confidence_loss
    acceptance, position_count = _acceptance_per_position(token_acceptance, mask)
    return DSparkLossOutput(
        loss=loss,
        ce_loss=ce_loss,
        l1_loss=l1_loss,
        confidence_loss=confidence_loss,
        weight_sum=weight_sum,
        acceptance=acceptance,
        position_count=position_count,
        token_acceptance=token_acceptance,
    )


def _acceptance_per_position(
    token_acceptance: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean acceptance of each block position over its valid positions [block], and their count [block]."""
    block_size = mask.shape[-1]
    flat_mask = mask.reshape(-1, block_size)
    position_count = flat_mask.sum(0)
    return (token_acceptance.reshape(-1, block_size) * flat_mask).sum(0) / position_count, position_count


def _target_terms(
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor | None,
    vocab_ids: torch.Tensor | None,
    target_probs: torch.Tensor | None,
    target_outside_mass: torch.Tensor | None,
    target_rows: torch.Tensor | None,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's probabilities over the draft logits' ids and its mass outside them, from whichever of
    `target_logits` / `target_probs` was given, with their shapes checked against `draft_logits`."""
    width = draft_logits.shape[-1]
    if (target_logits is None) == (target_probs is None):
        raise ValueError("Pass exactly one of target_logits and target_probs.")
    if target_rows is not None:
        if target_probs is None or target_probs.dim() != 2 or target_probs.shape[-1] != width:
            raise ValueError(f"target_rows needs target_probs of shape [N, {width}].")
        if target_outside_mass is not None and target_outside_mass.shape != target_probs.shape[:1]:
            raise ValueError(
                f"target_outside_mass {tuple(target_outside_mass.shape)} must hold one value per row of "
                f"target_probs, {tuple(target_probs.shape[:1])}."
            )
    if vocab_ids is not None and vocab_ids.shape != (width,):
        raise ValueError(
            f"vocab_ids {tuple(vocab_ids.shape)} must list the {width} ids of draft_logits' last dimension."
        )
    if target_logits is not None:
        expected = (*draft_logits.shape[:-1], target_logits.shape[-1] if vocab_ids is not None else width)
        if target_logits.shape != expected:
            raise ValueError(
                f"target_logits {tuple(target_logits.shape)} must have the shape of draft_logits "
                f"{tuple(draft_logits.shape)}"
                + (" over the full vocabulary." if vocab_ids is not None else ".")
            )
        return target_distribution(target_logits, vocab_ids, chunk_size)
    if target_rows is None and target_probs.shape != draft_logits.shape:
        raise ValueError(
            f"target_probs {tuple(target_probs.shape)} must have the shape of draft_logits "
            f"{tuple(draft_logits.shape)}."
        )
    if target_outside_mass is None:
        target_outside_mass = target_probs.new_zeros(target_probs.shape[:-1])
    return target_probs, target_outside_mass


def _check_position_shapes(draft_logits: torch.Tensor, **per_position: torch.Tensor | None) -> None:
    """Raise a ValueError unless every given per-position tensor has the draft logits' shape without the
    vocabulary dimension."""
    for name, tensor in per_position.items():
        if tensor is not None and tensor.shape != draft_logits.shape[:-1]:
            raise ValueError(
                f"{name} {tuple(tensor.shape)} must have the shape of draft_logits without the vocabulary "
                f"dimension, {tuple(draft_logits.shape[:-1])}."
            )


def _distribution_terms(
    draft_logits: torch.Tensor,
    target_probs: torch.Tensor,
    target_outside_mass: torch.Tensor,
    target_rows: torch.Tensor | None,
    labels: torch.Tensor,
    vocab_ids: torch.Tensor | None,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position cross-entropy and L1 distance [..., block], computed over row chunks."""
    width = draft_logits.shape[-1]
    label_index = labels if vocab_ids is None else draft_index(vocab_ids, labels)
    outside = target_outside_mass.detach().float()
    if target_rows is not None:
        target_rows = target_rows.reshape(-1)
        outside = outside[target_rows]
    ce, l1 = _ChunkedDistributionTerms.apply(
        draft_logits.reshape(-1, width),
        target_probs.detach().reshape(-1, width),
        target_rows,
        outside.reshape(-1),
        label_index.reshape(-1),
        chunk_size or max(1, _CHUNK_ELEMENTS // width),
    )
    return ce.view(labels.shape), l1.view(labels.shape)


def draft_index(vocab_ids: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Index of each token in the sorted `vocab_ids`, -1 for tokens outside them."""
    index = torch.searchsorted(vocab_ids, token_ids).clamp(max=vocab_ids.numel() - 1)
    return torch.where(vocab_ids[index] == token_ids, index, -1)


__all__ = ["DSparkLossOutput", "draft_index", "dspark_loss", "position_weights", "target_distribution"]
