"""Calibrated confidences: Sequential Temperature Scaling (`record_calibration_rounds`, `calibrate_sts`,
`apply_temperatures`, `survival_probabilities`) and the calibration metrics a benchmark reports per block
position (`expected_calibration_error`, `auroc`, `brier_score`, `calibration_report`,
`format_calibration_table`, `survival_outcomes`, `reliability_diagram`)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

# Temperatures 10^(e/40) for e in -52..52: 0.05 to 20, log-spaced, with exactly 1.0 (the identity) included.
DEFAULT_STS_GRID: tuple[float, ...] = tuple(10 ** (e / 40) for e in range(-52, 53))


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
    sampling = {"temperature": 1.0, "top_k": 0, "top_p": 1.0} if do_sample else {}
    device = next(target.parameters()).device
    rounds: list[CalibrationRound] = []
    torch.manual_seed(seed)
    with drafter.verification_options(
        confidence_threshold=0.0,
        confidence_scheduling=False,
        record_confidence=True,
        num_assistant_tokens=drafter.config.block_size,
        num_assistant_tokens_schedule="constant",
    ):
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
