"""Confidence-scheduled verification in one import: the target cost profile (`dspark_hf.cost_profile`),
the prefix schedulers (`dspark_hf.schedulers`) and confidence calibration with its metrics
(`dspark_hf.calibration`)."""

from .calibration import (
    DEFAULT_STS_GRID,
    CalibrationRound,
    apply_temperatures,
    auroc,
    brier_score,
    calibrate_sts,
    calibration_report,
    expected_calibration_error,
    format_calibration_table,
    record_calibration_rounds,
    reliability_diagram,
    survival_outcomes,
    survival_probabilities,
)
from .cost_profile import (
    CostProfile,
    profile_cost,
)
from .schedulers import (
    CausalPrefixScheduler,
    CostCurve,
    prefix_schedule,
)

__all__ = [
    "CalibrationRound",
    "CausalPrefixScheduler",
    "CostCurve",
    "CostProfile",
    "DEFAULT_STS_GRID",
    "apply_temperatures",
    "auroc",
    "brier_score",
    "calibrate_sts",
    "calibration_report",
    "expected_calibration_error",
    "format_calibration_table",
    "prefix_schedule",
    "profile_cost",
    "record_calibration_rounds",
    "reliability_diagram",
    "survival_outcomes",
    "survival_probabilities",
]
