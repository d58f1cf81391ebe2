"""Confidence-scheduled verification: how many drafts the target verifies, and calibrated confidences.

DSpark's confidence head predicts c_k, the probability that draft k survives verification given that
drafts 1..k-1 did; the prefix survival a_k = prod_{i<=k} c_i is the expected contribution of draft k to
the accepted length. Verifying more drafts costs target time, so the scheduler keeps a draft only while it
raises the expected throughput Theta = (expected tokens per round) x (target steps per second at that many
tokens). This module holds:

- the schedulers: `prefix_schedule` (Algorithm 1, a batch of requests) and `CausalPrefixScheduler` (the
  batch-1 rule the drafter applies while it drafts). Both stop at the FIRST non-improvement of Theta, so
  the decision to verify draft k never depends on draft k itself, which keeps speculative sampling
  lossless (a search that picks the best length after seeing every a_k is not: see the Appendix A case
  in the tests);
- the target cost model: `profile_cost` measures the target's forward time for 1..N new tokens once per
  machine and returns a `CostProfile` that saves to a small JSON;
- Sequential Temperature Scaling (`record_calibration_rounds`, `calibrate_sts`, `apply_temperatures`,
  `survival_probabilities`) and the calibration metrics a benchmark reports per block position
  (`expected_calibration_error`, `auroc`, `brier_score`, `calibration_report`, `format_calibration_table`,
  `survival_outcomes`, `reliability_diagram`).

Cost curves: wherever one is taken, pass either `cost_curve` (steps per second, SPS) or the keyword
`seconds_per_step` (its reciprocal), as a `CostProfile`, a callable `B -> value` or a sequence whose
element `B - 1` is the value at B tokens (element 0 is one token: the anchor alone). A sequence is also a
token budget: a schedule never uses more tokens than it covers.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

# Temperatures 10^(e/40) for e in -52..52: 0.05 to 20, log-spaced, with exactly 1.0 (the identity) included.
DEFAULT_STS_GRID: tuple[float, ...] = tuple(10 ** (e / 40) for e in range(-52, 53))


# ----------------------------------------------------------------------------------------------------------
# Target cost profile
# ----------------------------------------------------------------------------------------------------------


@dataclass
class CostProfile:
    """Target forward time per number of verified tokens, measured once per machine by `profile_cost`.

    Args:
        seconds_per_step (`list[float]`): element `B - 1` is the median time of one target forward over B new
            tokens (the anchor plus B - 1 drafts) on a cache of `context_length` tokens.
        context_length (`int`): tokens already in the target's cache while timing.
        metadata (`dict`): how and where it was measured (machine, threads, dtype, date, versions).
    """

    seconds_per_step: list[float]
    context_length: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.seconds_per_step = [float(s) for s in self.seconds_per_step]
        if not self.seconds_per_step or not all(math.isfinite(s) and s > 0 for s in self.seconds_per_step):
            raise ValueError(f"seconds_per_step must be non-empty and positive, got {self.seconds_per_step}.")

    @property
    def max_tokens(self) -> int:
        return len(self.seconds_per_step)

    def seconds(self, num_tokens: int) -> float:
        """Seconds per target step at `num_tokens` verified tokens."""
        if not 1 <= num_tokens <= self.max_tokens:
            raise ValueError(f"The profile covers 1..{self.max_tokens} tokens, got {num_tokens}.")
        return self.seconds_per_step[num_tokens - 1]

    def sps(self, num_tokens: int) -> float:
        """Target steps per second SPS(B) at B = `num_tokens` verified tokens."""
        return 1.0 / self.seconds(num_tokens)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> CostProfile:
        return cls(**json.loads(text))

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> CostProfile:
        return cls.from_json(Path(path).read_text())


CostCurve = CostProfile | Callable[[int], float] | Sequence[float] | torch.Tensor


def _synchronize(device: torch.device) -> None:
    """Wait for queued kernels so wall-clock timings cover the whole forward (no-op on CPU)."""
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and hasattr(backend, "synchronize"):
        backend.synchronize()


@torch.inference_mode()
def profile_cost(
    target: torch.nn.Module,
    *,
    max_tokens: int = 16,
    context_length: int = 256,
    warmup: int = 2,
    repeats: int = 5,
    seed: int = 0,
    show_progress: bool = True,
) -> CostProfile:
    """Measure the target's forward time for 1..`max_tokens` new tokens on a cache of `context_length` tokens.

    Verification cost depends on the tokens per forward and on the cache length, so the cache is prefilled
    once with random tokens and every timed forward starts from that same length (the cache is cropped back
    after each one). Token counts are interleaved inside each repeat so machine-load drift hits all of them
    alike; the median over `repeats` is kept, then made non-decreasing in B (a running maximum): verifying
    one more token never really costs less, and a noisy dip would make the scheduler verify useless drafts.
    """
    from transformers import DynamicCache
    from transformers import __version__ as transformers_version

    if max_tokens < 1 or context_length < 1 or repeats < 1 or warmup < 0:
        raise ValueError("max_tokens, context_length and repeats must be >= 1 and warmup >= 0.")
    config = target.config
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions is not None and context_length + max_tokens > max_positions:
        raise ValueError(
            f"context_length + max_tokens = {context_length + max_tokens} exceeds the target's "
            f"max_position_embeddings ({max_positions})."
        )
    # transformers 5.24 renamed the forward's `past_key_values` to `cache`; support both spellings.
    cache_kwarg = "cache" if "cache" in inspect.signature(target.forward).parameters else "past_key_values"
    device = next(target.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    vocab_size = config.get_text_config().vocab_size
    context = torch.randint(vocab_size, (1, context_length), generator=generator).to(device)
    new_tokens = torch.randint(vocab_size, (1, max_tokens), generator=generator).to(device)

    was_training = target.training
    target.eval()
    try:
        cache = DynamicCache(config=config)
        target(context, use_cache=True, **{cache_kwarg: cache})
        timings: list[list[float]] = [[] for _ in range(max_tokens)]
        total = (warmup + repeats) * max_tokens
        with tqdm(total=total, desc="profiling target", disable=not show_progress) as progress:
            for repeat in range(warmup + repeats):
                for num_tokens in range(1, max_tokens + 1):
                    _synchronize(device)
                    start = time.perf_counter()
                    target(new_tokens[:, :num_tokens], use_cache=True, **{cache_kwarg: cache})
                    _synchronize(device)
                    elapsed = time.perf_counter() - start
                    # A negative argument removes that many tokens in every transformers version we support.
                    cache.crop(-num_tokens)
                    if repeat >= warmup:
                        timings[num_tokens - 1].append(elapsed)
                    progress.update()
    finally:
        target.train(was_training)

    seconds, running_max = [], 0.0
    for samples in timings:
        running_max = max(running_max, statistics.median(samples))
        seconds.append(running_max)
    # No host name: the profile is stored in the drafter's config, which may be published.
    metadata = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "dtype": str(next(target.parameters()).dtype).removeprefix("torch."),
        "model": getattr(config, "name_or_path", "") or config.model_type,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "warmup": warmup,
        "repeats": repeats,
        "torch": torch.__version__,
        "transformers": transformers_version,
    }
    return CostProfile(seconds_per_step=seconds, context_length=context_length, metadata=metadata)


# ----------------------------------------------------------------------------------------------------------
# Schedulers
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Calibration: Sequential Temperature Scaling and metrics
# ----------------------------------------------------------------------------------------------------------


class CalibrationRound(NamedTuple):
    """One recorded verification round: confidence logits of the verified block positions and how many of
    those drafts the target accepted. Record rounds with the full block verified (no scheduling, no
    threshold), or positions would be observed only when the confidence was already high. A plain
    `(logits, accepted)` tuple works too."""

    confidence_logits: torch.Tensor | Sequence[float]
    accepted_length: int


def apply_temperatures(
    confidence_logits: torch.Tensor,
    temperatures: Sequence[float] | torch.Tensor | None,
    *,
    start: int = 0,
) -> torch.Tensor:
    """Divide confidence logits [..., K] of block positions start+1..start+K by their STS temperatures.

    `temperatures=None` (no calibration fitted) returns the logits unchanged. The drafter, which computes
    one position at a time, passes the [..., 1] logits of block position k + 1 with `start=k`.
    """
    if temperatures is None:
        return confidence_logits
    temperatures = torch.as_tensor(
        temperatures, dtype=confidence_logits.dtype, device=confidence_logits.device
    )
    end = start + confidence_logits.shape[-1]
    if temperatures.ndim != 1 or start < 0 or temperatures.numel() < end:
        raise ValueError(f"Need temperatures for positions {start + 1}..{end}, got {temperatures.tolist()}.")
    if not bool((temperatures > 0).all()):
        raise ValueError(f"Temperatures must be positive, got {temperatures.tolist()}.")
    return confidence_logits / temperatures[start:end]


def survival_probabilities(
    confidence_logits: torch.Tensor, temperatures: Sequence[float] | torch.Tensor | None = None
) -> torch.Tensor:
    """Prefix survival a_k = prod_{i<=k} sigmoid(z_i / T_i) along the last dim, computed in log space."""
    return torch.exp(torch.cumsum(F.logsigmoid(apply_temperatures(confidence_logits, temperatures)), dim=-1))


def _round_table(
    rounds: Iterable[CalibrationRound | tuple[Any, int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rounds -> logits [N, K] (0 where not verified), survival 1[accepted >= k] [N, K], mask [N, K]."""
    logits_rows, accepted = [], []
    for logits, accepted_length in rounds:
        row = torch.as_tensor(logits, dtype=torch.float64).detach().cpu().reshape(-1)
        if not 0 <= int(accepted_length) <= row.numel():
            raise ValueError(
                f"accepted_length {accepted_length} is outside 0..{row.numel()} verified positions."
            )
        logits_rows.append(row)
        accepted.append(int(accepted_length))
    if not logits_rows:
        raise ValueError("No calibration rounds given.")
    width = max(row.numel() for row in logits_rows)
    logits = torch.zeros(len(logits_rows), width, dtype=torch.float64)
    lengths = torch.tensor([row.numel() for row in logits_rows])
    for i, row in enumerate(logits_rows):
        logits[i, : row.numel()] = row
    positions = torch.arange(1, width + 1)
    mask = positions <= lengths[:, None]
    survived = positions <= torch.tensor(accepted)[:, None]
    return logits, survived, mask


@torch.no_grad()
def record_calibration_rounds(
    target: torch.nn.Module,
    drafter: torch.nn.Module,
    prompts: Iterable[torch.Tensor],
    *,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    seed: int = 0,
    show_progress: bool = True,
) -> list[CalibrationRound]:
    """Generate with `target.generate(assistant_model=drafter)` on `prompts` ([1, L] input ids each) with the
    full block verified, and return every round's raw confidence logits and accepted length.

    The drafter (a `DSparkForCausalLM` attached to `target`) runs with confidence threshold and scheduling off
    and a constant block meanwhile, since a truncated block would only show positions whose confidence was
    already high; its generation config is restored afterwards. Calibrate in the decoding mode you serve:
    greedy acceptance (argmax match) and sampled acceptance (temperature 1 here) differ.
    """
    options = drafter.generation_config
    full_block = copy.deepcopy(options)
    for name, value in {
        "confidence_threshold": 0.0,
        "confidence_scheduling": False,
        "record_confidence": True,
        "num_assistant_tokens": drafter.config.block_size,
        "num_assistant_tokens_schedule": "constant",
    }.items():
        setattr(full_block, name, value)
    sampling = {"temperature": 1.0, "top_k": 0, "top_p": 1.0} if do_sample else {}
    device = next(target.parameters()).device
    rounds: list[CalibrationRound] = []
    torch.manual_seed(seed)
    drafter.generation_config = full_block
    try:
        for input_ids in tqdm(prompts, desc="recording rounds", unit="prompt", disable=not show_progress):
            input_ids = input_ids.to(device)
            target.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                assistant_model=drafter,
                do_sample=do_sample,
                max_new_tokens=max_new_tokens,
                **sampling,
            )
            rounds.extend(drafter.last_stats.calibration_rounds())
    finally:
        drafter.generation_config = options
    return rounds


def calibrate_sts(
    rounds: Iterable[CalibrationRound | tuple[Any, int]],
    grid: Sequence[float] = DEFAULT_STS_GRID,
    *,
    num_positions: int | None = None,
    n_bins: int = 10,
) -> list[float]:
    """Sequential Temperature Scaling: one temperature per block position, fitted left to right.

    a_k = prod_{i<=k} sigmoid(z_i / T_i) predicts P(drafts 1..k all accepted), whose observed value in a
    round is 1[accepted_length >= k]. For k = 1, 2, ... in turn, T_k is the grid value minimising the ECE of
    a_k over every round that verified position k, T_1..T_{k-1} being fixed. Each sigmoid(z / T) is monotone
    in z, so the order of the confidences at a position is preserved. Ties prefer the temperature closest to
    1; include 1.0 in `grid` so a position can stay uncalibrated.

    Args:
        rounds: recorded `CalibrationRound`s (or `(confidence_logits, accepted_length)` tuples).
        grid: candidate temperatures (positive).
        num_positions: length of the result (e.g. the drafter's block size); positions never verified get 1.0.
        n_bins: equal-width bins of the ECE.

    Returns:
        the temperatures, as stored in `DSparkConfig.confidence_temperatures`.
    """
    candidates = torch.as_tensor(grid, dtype=torch.float64).reshape(-1)
    if candidates.numel() == 0 or not bool((candidates > 0).all()):
        raise ValueError(f"The temperature grid must be non-empty and positive, got {list(grid)}.")
    # Ties in argmin go to the first minimum, so list the candidates by their distance to 1.
    candidates = candidates[torch.sort(candidates.log().abs(), stable=True).indices]
    logits, survived, mask = _round_table(rounds)
    num_positions = logits.shape[1] if num_positions is None else num_positions
    if num_positions < 1:
        raise ValueError(f"num_positions must be >= 1, got {num_positions}.")

    temperatures = [1.0] * num_positions
    log_prefix = torch.zeros(logits.shape[0], dtype=torch.float64)  # log a_{k-1} with the fitted temperatures
    for k in range(min(num_positions, logits.shape[1])):
        rows = mask[:, k]
        if rows.any():
            probs = torch.exp(log_prefix[rows] + F.logsigmoid(logits[rows, k] / candidates[:, None]))
            errors = _binned_calibration_error(probs, survived[rows, k].double(), n_bins)
            temperatures[k] = float(candidates[torch.argmin(errors)])
        log_prefix = log_prefix + F.logsigmoid(logits[:, k] / temperatures[k])
    return temperatures


def _as_probs_and_labels(probs: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.as_tensor(probs, dtype=torch.float64).detach().cpu().reshape(-1)
    labels = torch.as_tensor(labels).detach().cpu().reshape(-1).double()
    if probs.numel() == 0 or probs.shape != labels.shape:
        raise ValueError(
            f"Need equally many scores and labels (> 0), got {probs.numel()} and {labels.numel()}."
        )
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("labels must be 0/1 (or booleans).")
    return probs, labels


def _bin_sums(
    probs: torch.Tensor, labels: torch.Tensor, n_bins: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per equal-width bin of [0, 1]: counts, sums of probabilities, sums of labels (leading dims batched)."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}.")
    if not bool(((probs >= 0) & (probs <= 1)).all()):
        raise ValueError("probabilities must lie in [0, 1].")
    bins = (probs * n_bins).long().clamp(max=n_bins - 1)
    zeros = probs.new_zeros(*probs.shape[:-1], n_bins)
    counts = zeros.scatter_add(-1, bins, torch.ones_like(probs))
    prob_sums = zeros.scatter_add(-1, bins, probs)
    label_sums = zeros.scatter_add(-1, bins, labels.expand_as(probs))
    return counts, prob_sums, label_sums


def _binned_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int) -> torch.Tensor:
    """ECE = sum_b (n_b / N) |mean p_b - mean y_b| = sum_b |sum p_b - sum y_b| / N (leading dims batched)."""
    _, prob_sums, label_sums = _bin_sums(probs, labels, n_bins)
    return (prob_sums - label_sums).abs().sum(-1) / probs.shape[-1]


def expected_calibration_error(probs: Any, labels: Any, n_bins: int = 10) -> float:
    """Expected calibration error over `n_bins` equal-width bins (a probability of 1 falls in the last)."""
    probs, labels = _as_probs_and_labels(probs, labels)
    return float(_binned_calibration_error(probs, labels, n_bins))


def brier_score(probs: Any, labels: Any) -> float:
    """Mean squared error between predicted probabilities and 0/1 outcomes."""
    probs, labels = _as_probs_and_labels(probs, labels)
    return float(((probs - labels) ** 2).mean())


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve: P(score of a random positive > that of a random negative), ties counting 1/2.

    Computed as the Mann-Whitney statistic over mid-ranks. Returns NaN when only one class is present (e.g. a
    block position every round accepted), so per-position tables need no special case.
    """
    scores, labels = _as_probs_and_labels(scores, labels)
    positives = labels.bool()
    num_pos, num_neg = int(positives.sum()), int((~positives).sum())
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    _, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    last_rank = counts.cumsum(0).double()
    mid_ranks = last_rank - (counts.double() - 1) / 2
    rank_sum = float(mid_ranks[inverse][positives].sum())
    return (rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)


def calibration_report(
    rounds: Iterable[CalibrationRound | tuple[Any, int]],
    temperatures: Sequence[float] | None = None,
    *,
    n_bins: int = 10,
) -> list[dict[str, float]]:
    """Per block position k: rounds that verified it, mean predicted a_k, observed survival rate, and the
    ECE, AUROC and Brier score of a_k against 1[accepted >= k], with `temperatures` applied (None = raw)."""
    logits, survived, mask = _round_table(rounds)
    probs = survival_probabilities(logits, temperatures)
    report = []
    for k in range(logits.shape[1]):
        rows = mask[:, k]
        p, y = probs[rows, k], survived[rows, k]
        report.append(
            {
                "position": k + 1,
                "count": int(rows.sum()),
                "mean_survival": float(p.mean()),
                "observed_survival": float(y.double().mean()),
                "ece": expected_calibration_error(p, y, n_bins),
                "auroc": auroc(p, y),
                "brier": brier_score(p, y),
            }
        )
    return report


def survival_outcomes(
    rounds: Iterable[CalibrationRound | tuple[Any, int]],
    temperatures: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted a_k and observed 1[accepted >= k] of every verified (round, position), pooled over positions
    (e.g. for `reliability_diagram`), with `temperatures` applied (None = raw)."""
    logits, survived, mask = _round_table(rounds)
    return survival_probabilities(logits, temperatures)[mask], survived[mask]


def format_calibration_table(
    rounds: Iterable[CalibrationRound | tuple[Any, int]],
    temperatures: Sequence[float],
    *,
    n_bins: int = 10,
) -> str:
    """A text table of the raw vs the `temperatures`-calibrated survival a_k per block position and pooled
    over all verified positions: rounds, observed survival, then ECE, AUROC and Brier as raw -> calibrated."""
    rounds = list(rounds)
    metrics = {"ece": "ECE", "auroc": "AUROC", "brier": "Brier"}
    reports = [calibration_report(rounds, t, n_bins=n_bins) for t in (None, temperatures)]
    rows = [
        (str(raw["position"]), f"{temperatures[raw['position'] - 1]:.2f}", raw, calibrated)
        for raw, calibrated in zip(*reports)
    ]
    pooled = []
    for t in (None, temperatures):
        probs, labels = survival_outcomes(rounds, t)
        pooled.append(
            {
                "count": labels.numel(),
                "observed_survival": float(labels.double().mean()),
                "ece": expected_calibration_error(probs, labels, n_bins),
                "auroc": auroc(probs, labels),
                "brier": brier_score(probs, labels),
            }
        )
    rows.append(("all", "", *pooled))
    lines = [
        f"{'pos':>3}  {'T':>5}  {'rounds':>6}  {'survived':>8}"
        + "".join(f"  {name:^14}" for name in metrics.values())
    ]
    for position, temperature, before, after in rows:
        cells = "".join(f"  {before[m]:>5.3f} -> {after[m]:<5.3f}" for m in metrics)
        observed = before["observed_survival"]
        lines.append(f"{position:>3}  {temperature:>5}  {before['count']:>6}  {observed:>8.3f}{cells}")
    return "\n".join(lines)


def reliability_diagram(
    probs: Any | Mapping[str, Any],
    labels: Any,
    path: str | os.PathLike,
    *,
    n_bins: int = 10,
    title: str | None = None,
) -> Path:
    """Save a reliability diagram PNG: observed frequency vs mean predicted probability per bin.

    `probs` may be a mapping of series name to probabilities (e.g. {"raw": ..., "STS": ...}) to compare
    calibrations of the same outcomes `labels`; each series' legend entry shows its ECE.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = dict(probs) if isinstance(probs, Mapping) else {"": probs}
    figure, axes = plt.subplots(figsize=(4.5, 4.5))
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    for name, values in series.items():
        values, outcomes = _as_probs_and_labels(values, labels)
        counts, prob_sums, label_sums = _bin_sums(values, outcomes, n_bins)
        filled = counts > 0
        ece = float(_binned_calibration_error(values, outcomes, n_bins))
        axes.plot(
            (prob_sums[filled] / counts[filled]).tolist(),
            (label_sums[filled] / counts[filled]).tolist(),
            marker="o",
            label=f"{name} (ECE {ece:.3f})".strip(),
        )
    axes.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted survival", ylabel="observed survival", title=title)
    axes.legend(loc="upper left", fontsize="small")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
