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
    """Per-row cross-entropy and L1 distance between softmax(draft) and softmax(target), in row chunks.

    Only the input logits are kept for backward; each chunk's probabilities are recomputed there and its
    gradient written straight into one buffer of the logits' shape. The target logits are constants.
    """

    @staticmethod
    def forward(ctx, draft_logits, target_logits, labels, rows_per_chunk: int):
        dtype = torch.promote_types(draft_logits.dtype, torch.float32)
        num_rows = draft_logits.shape[0]
        ce = draft_logits.new_empty(num_rows, dtype=dtype)
        l1 = draft_logits.new_empty(num_rows, dtype=dtype)
        for start in range(0, num_rows, rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            log_probs = torch.log_softmax(draft_logits[rows].to(dtype), dim=-1)
            target_probs = torch.softmax(target_logits[rows].to(dtype), dim=-1)
            ce[rows] = -log_probs.gather(-1, labels[rows, None]).squeeze(-1)
            l1[rows] = (log_probs.exp() - target_probs).abs().sum(-1)
        ctx.save_for_backward(draft_logits, target_logits, labels)
        ctx.rows_per_chunk = rows_per_chunk
        return ce, l1

    @staticmethod
    def backward(ctx, grad_ce, grad_l1):
        draft_logits, target_logits, labels = ctx.saved_tensors
        dtype = grad_ce.dtype
        grad = torch.empty_like(draft_logits)
        for start in range(0, draft_logits.shape[0], ctx.rows_per_chunk):
            rows = slice(start, start + ctx.rows_per_chunk)
            probs = torch.softmax(draft_logits[rows].to(dtype), dim=-1)
            sign = torch.sign(probs - torch.softmax(target_logits[rows].to(dtype), dim=-1))
            # d CE / dz = p - onehot(y);  d L1 / dz_j = p_j * (s_j - sum_v s_v p_v) with s = sign(p - p_t).
            chunk_grad = grad_l1[rows, None] * probs * (sign - (sign * probs).sum(-1, keepdim=True))
            chunk_grad += grad_ce[rows, None] * probs
            chunk_grad.scatter_add_(-1, labels[rows, None], -grad_ce[rows, None])
            grad[rows] = chunk_grad
        return grad, None, None, None


def position_weights(block_size: int, decay_gamma: float, device: torch.device | None = None) -> torch.Tensor:
    """exp(-k / decay_gamma) for 0-based block positions k: early positions matter most, since a rejection
    ends the block."""
    if not decay_gamma > 0:
        raise ValueError(f"decay_gamma must be > 0, got {decay_gamma}.")
    return torch.exp(-torch.arange(block_size, device=device, dtype=torch.float32) / decay_gamma)


def dspark_loss(
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    confidence_logits: torch.Tensor | None = None,
    *,
    ce_weight: float = 0.1,
    l1_weight: float = 0.9,
    confidence_weight: float = 1.0,
    decay_gamma: float = 4.0,
    chunk_size: int | None = None,
) -> DSparkLossOutput:
    r"""
    The DSpark loss over blocks of drafted positions (DSpark paper, section 5; DeepSpec's defaults).

    Args:
        draft_logits: [..., block, V] drafter logits (after the Markov bias).
        target_logits: [..., block, V] target logits at the same positions; treated as a constant.
        labels: [..., block] ground-truth next tokens.
        loss_mask: [..., block] bool, True on supervised positions; already cut at the first invalid label of
            each block (the terms only read it, positions after a hole are not dropped here).
        confidence_logits: [..., block] pre-sigmoid confidence, trained towards the detached acceptance.
        ce_weight, l1_weight, confidence_weight: weights of the three terms.
        decay_gamma: position k (0-based) weighs exp(-k / decay_gamma).
        chunk_size: rows (block positions) per chunk of the vocabulary computation; by default about 16M
            logits per chunk.

    All math runs in (at least) float32. Each term is normalised by the sum of the position weights over the
    valid positions; a batch without valid positions gives zero terms.
    """
    if target_logits.shape != draft_logits.shape:
        raise ValueError(
            f"target_logits {tuple(target_logits.shape)} must have the shape of draft_logits "
            f"{tuple(draft_logits.shape)}."
        )
    per_position = {"labels": labels, "loss_mask": loss_mask, "confidence_logits": confidence_logits}
    for name, tensor in per_position.items():
        if tensor is not None and tensor.shape != draft_logits.shape[:-1]:
            raise ValueError(
                f"{name} {tuple(tensor.shape)} must have the shape of draft_logits without the vocabulary "
                f"dimension, {tuple(draft_logits.shape[:-1])}."
            )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    block_size, vocab_size = draft_logits.shape[-2:]
    mask = loss_mask.bool()
    weights = position_weights(block_size, decay_gamma, draft_logits.device) * mask
    weight_sum = weights.sum()
    denominator = weight_sum.clamp_min(torch.finfo(torch.float32).tiny)

    rows_per_chunk = chunk_size or max(1, _CHUNK_ELEMENTS // vocab_size)
    ce, l1 = _ChunkedDistributionTerms.apply(
        draft_logits.reshape(-1, vocab_size),
        target_logits.detach().reshape(-1, vocab_size),
        labels.masked_fill(~mask, 0).reshape(-1),
        rows_per_chunk,
    )
    ce, l1 = ce.view(labels.shape), l1.view(labels.shape)
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

    flat_mask = mask.reshape(-1, block_size)
    position_count = flat_mask.sum(0)
    acceptance = (token_acceptance.reshape(-1, block_size) * flat_mask).sum(0) / position_count
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


__all__ = ["DSparkLossOutput", "dspark_loss", "position_weights"]
