"""Confidence-scheduled verification: how many drafts the target verifies.

DSpark's confidence head predicts c_k, the probability that draft k survives verification given that
drafts 1..k-1 did; the prefix survival a_k = prod_{i<=k} c_i is the expected contribution of draft k to
the accepted length. Verifying more drafts costs target time, so a scheduler keeps a draft only while it
raises the expected throughput Theta = (expected tokens per round) x (target steps per second at that many
tokens): `prefix_schedule` (Algorithm 1, a batch of requests) and `CausalPrefixScheduler` (the batch-1 rule
the drafter applies while it drafts). Both stop at the FIRST non-improvement of Theta, so the decision to
verify draft k never depends on draft k itself, which keeps speculative sampling lossless (a search that
picks the best length after seeing every a_k is not: see the Appendix A case in the tests).

Cost curves: wherever one is taken, pass either `cost_curve` (steps per second, SPS) or the keyword
`seconds_per_step` (its reciprocal), as a `CostProfile`, a callable `B -> value` or a sequence whose
element `B - 1` is the value at B tokens (element 0 is one token: the anchor alone). A sequence is also a
token budget: a schedule never uses more tokens than it covers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .cost_profile import CostProfile

# A cost curve: steps (or seconds) per target forward as a function of the verified tokens B.
CostCurve = CostProfile | Callable[[int], float] | Sequence[float] | torch.Tensor


@dataclass(frozen=True)
class _StepRate:
    """A cost curve resolved to steps per second SPS(B), plus the token budget a sequence curve implies."""

    values: torch.Tensor | None  # SPS for B = 1..len, when the curve is a sequence
    function: Callable[[int], float] | None
    max_tokens: int | None

    @classmethod
    def resolve(cls, cost_curve: Any, seconds_per_step: Any) -> _StepRate:
        if (cost_curve is None) == (seconds_per_step is None):
            raise ValueError("Pass exactly one of `cost_curve` (steps per second) or `seconds_per_step`.")
        if isinstance(cost_curve, CostProfile):
            cost_curve, seconds_per_step = None, cost_curve.seconds_per_step
        elif isinstance(seconds_per_step, CostProfile):
            seconds_per_step = seconds_per_step.seconds_per_step
        invert = cost_curve is None
        curve = seconds_per_step if invert else cost_curve
        if callable(curve):
            return cls(values=None, function=(lambda b: 1.0 / curve(b)) if invert else curve, max_tokens=None)
        values = torch.as_tensor(curve, dtype=torch.float64)
        if (
            values.ndim != 1
            or values.numel() == 0
            or not bool(torch.all(values > 0) & values.isfinite().all())
        ):
            raise ValueError(f"A cost curve sequence must be 1-D, non-empty and positive, got {curve}.")
        return cls(values=1.0 / values if invert else values, function=None, max_tokens=values.numel())

    def __call__(self, num_tokens: torch.Tensor) -> torch.Tensor:
        """SPS at each entry of the integer tensor `num_tokens` (all within the budget)."""
        if self.values is not None:
            return self.values[num_tokens - 1]
        rates = torch.tensor([float(self.function(int(b))) for b in num_tokens], dtype=torch.float64)
        if not bool(torch.all(rates > 0) & rates.isfinite().all()):
            raise ValueError(f"The cost curve must be positive and finite, got {rates.tolist()}.")
        return rates


def _survival_table(survival: torch.Tensor | Sequence[Sequence[float]]) -> torch.Tensor:
    """Pad ragged rows with zeros (never admitted) into a float64 [R, J] table; check they are survivals."""
    if isinstance(survival, torch.Tensor):
        if survival.ndim != 2:
            raise ValueError(
                f"survival must be 2-D [requests, positions], got shape {tuple(survival.shape)}."
            )
        table = survival.detach().to("cpu", torch.float64)
    else:
        rows = [torch.as_tensor(row, dtype=torch.float64).reshape(-1) for row in survival]
        width = max((row.numel() for row in rows), default=0)
        table = torch.zeros(len(rows), width, dtype=torch.float64)
        for r, row in enumerate(rows):
            table[r, : row.numel()] = row
    if not bool(((table >= 0) & (table <= 1)).all()):
        raise ValueError("survival values must lie in [0, 1].")
    if not bool((table[:, 1:] <= table[:, :-1]).all()):
        raise ValueError(
            "survival must be non-increasing along each row: a_{r,j} is the cumulative product of the "
            "confidences of drafts 1..j (see `survival_probabilities`)."
        )
    return table


def prefix_schedule(
    survival: torch.Tensor | Sequence[Sequence[float]],
    cost_curve: CostCurve | None = None,
    *,
    seconds_per_step: CostCurve | None = None,
) -> torch.Tensor:
    """Number of drafts to verify for each of R requests (DSpark's Algorithm 1, hardware-aware scheduling).

    Every request verifies at least its anchor, so the start is B = R tokens with tau* = R expected tokens
    and Theta = R x SPS(R). Candidates (r, j) are admitted in descending a_{r,j} (ties: lower j first, then
    lower r), each adding one token (B += 1) and a_{r,j} expected tokens (tau* += a_{r,j}); admission STOPS
    at the first candidate whose Theta = tau* x SPS(B) does not strictly improve. Rows being non-increasing,
    the admitted set is a prefix of every row and the best tau* for its B; the early stop keeps it lossless.

    Args:
        survival: a_{r,j}, the prefix survival of draft j + 1 of request r, as an [R, J] tensor or ragged
            rows; zeros (padding, or drafts that cannot survive) are never admitted.
        cost_curve: steps per second SPS(B) at B verified tokens (forms: see the module docstring).
        seconds_per_step: the same curve as seconds per step; pass exactly one of the two.

    Returns:
        `torch.LongTensor` [R]: how many leading drafts of each request to verify.
    """
    table = _survival_table(survival)
    rate = _StepRate.resolve(cost_curve, seconds_per_step)
    num_requests, width = table.shape
    if rate.max_tokens is not None and num_requests > rate.max_tokens:
        raise ValueError(
            f"The cost curve covers {rate.max_tokens} tokens, fewer than the {num_requests} anchors."
        )
    # Flatten position-major so the stable sort breaks ties by lower position first, then lower request.
    scores = table.t().reshape(-1)
    requests = torch.arange(num_requests).repeat(width)
    scores, requests = scores[scores > 0], requests[scores > 0]
    order = torch.sort(scores, descending=True, stable=True).indices
    budget = (
        scores.numel() if rate.max_tokens is None else min(scores.numel(), rate.max_tokens - num_requests)
    )
    scores, requests = scores[order][:budget], requests[order][:budget]

    num_tokens = num_requests + torch.arange(budget + 1)
    expected = num_requests + torch.cat([scores.new_zeros(1), scores.cumsum(0)])
    throughput = expected * rate(num_tokens)
    improves = throughput[1:] > throughput[:-1]
    admitted = int(improves.long().cumprod(0).sum())
    return torch.bincount(requests[:admitted], minlength=num_requests)


class CausalPrefixScheduler:
    """Batch-1 scheduler the drafter consults position by position while drafting one block.

    Draft j is admitted iff (1 + sum_{i<=j} a_i) / T(1 + j) > (1 + sum_{i<j} a_i) / T(j), drafts 1..j-1
    being admitted, and the block stops at the first refusal. It only ever sees a_1..a_j, so whether x_j is
    verified never depends on x_j itself or on later drafts. This is `prefix_schedule` for R = 1, online.

    It composes with a static confidence threshold: the drafter stops at the first position refused by
    either rule. Once the scheduler refuses it keeps refusing until `reset()`, so the order of the checks
    does not matter.

    Example:
        scheduler = CausalPrefixScheduler(seconds_per_step=profile)  # once
        scheduler.reset()  # every round
        for k in range(block_size):
            ...  # draft x_{k+1} and its confidence logit z of shape [1, 1]
            c = apply_temperatures(z, config.confidence_temperatures, start=k).sigmoid().item()
            if c < threshold or not scheduler.admit_confidence(c):
                break

    Attributes:
        length (`int`): drafts admitted so far this round.
        expected_tokens (`float`): 1 + sum of the admitted a_j (the bonus/corrected token counts one).
        survival (`float`): a_j of the last admitted draft (1.0 before the first).
    """

    def __init__(
        self,
        cost_curve: CostCurve | None = None,
        *,
        seconds_per_step: CostCurve | None = None,
    ):
        self._rate = _StepRate.resolve(cost_curve, seconds_per_step)
        self.reset()

    def reset(self) -> None:
        """Start a new round: nothing admitted yet."""
        self.length = 0
        self.expected_tokens = 1.0
        self.survival = 1.0
        self._stopped = False

    def admit(self, survival: float) -> bool:
        """Whether to verify the next draft, whose prefix survival is `survival` (a_j = prod_{i<=j} c_i)."""
        survival = float(survival)
        if not 0.0 <= survival <= 1.0:
            raise ValueError(f"survival must lie in [0, 1], got {survival}.")
        if self._stopped:
            return False
        num_tokens = self.length + 1
        if survival > 0 and (self._rate.max_tokens is None or num_tokens < self._rate.max_tokens):
            now, then = self._rate(torch.tensor([num_tokens, num_tokens + 1])).tolist()
            if (self.expected_tokens + survival) * then > self.expected_tokens * now:
                self.length += 1
                self.expected_tokens += survival
                self.survival = survival
                return True
        self._stopped = True
        return False

    def admit_confidence(self, confidence: float) -> bool:
        """`admit` from the conditional confidence c_j: a_j = a_{j-1} x c_j is tracked here."""
        return self.admit(self.survival * float(confidence))
