"""A wall-clock training budget that both ends training and drives the learning-rate schedule.

A step-based schedule under a time limit stops wherever the clock runs out, often far from its annealed end
(the rate is still high when training stops). Here the schedule's progress is the fraction of the budget
spent, so warm-up and decay are fractions of the budget and the rate reaches its final value exactly when
training ends.

Under several processes each has its own clock; one that stopped a step early would leave the others
waiting in the gradient all-reduce, and each would apply a slightly different rate. With `agree`, the
processes adopt one clock reading (the main process's) after every optimizer step, before the scheduler
reads it: they stop on the same step with the same rates.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

from transformers import TrainerCallback

# Written into every checkpoint so that a resumed run continues the same budget and schedule.
BUDGET_STATE_FILE = "wall_clock_budget.json"
SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")


class WallClockBudget(TrainerCallback):
    """Budget of `minutes` of training; `lr_factor` is a LambdaLR multiplier that follows the clock.

    The clock starts at `on_train_begin`. `lr_factor` marks the budget spent the first time the scheduler
    sees progress >= 1 (and then returns the final factor); the step that follows is the last one.
    `agree` maps this process's elapsed seconds to the reading all processes share (e.g. a broadcast from
    the main process); progress then moves once per optimizer step, by that shared reading.
    """

    def __init__(
        self,
        minutes: float,
        schedule: str = "cosine",
        warmup_fraction: float = 0.0,
        agree: Callable[[float], float] | None = None,
    ):
        if not minutes > 0:
            raise ValueError(f"max_train_minutes must be > 0, got {minutes}.")
        if schedule not in SCHEDULES:
            raise ValueError(
                f"lr_scheduler_type {schedule!r} cannot follow a wall-clock budget; choose from {SCHEDULES}."
            )
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(
                f"With max_train_minutes, warmup_steps must be a fraction of the budget in [0, 1), got "
                f"{warmup_fraction}."
            )
        self.seconds = 60.0 * minutes
        self.schedule = schedule
        self.warmup_fraction = warmup_fraction
        self.elapsed_before = 0.0  # seconds spent by the run this one resumes
        self.started: float | None = None
        self.spent = False
        self.agree = agree
        self.agreed_elapsed = 0.0  # the shared reading at the last optimizer step (with `agree`)

    def elapsed(self) -> float:
        """Seconds of this process's clock since the budget started (resumed runs included)."""
        running = 0.0 if self.started is None else time.perf_counter() - self.started
        return self.elapsed_before + running

    def progress(self) -> float:
        elapsed = self.elapsed() if self.agree is None else self.agreed_elapsed
        return min(1.0, elapsed / self.seconds)

    def lr_factor(self, step: int) -> float:
        """Multiplier of the peak rate at the current clock time (`step` is ignored)."""
        progress = self.progress()
        if progress >= 1.0:
            self.spent = True
        if self.schedule == "constant":
            return 1.0
        if progress < self.warmup_fraction:
            return progress / self.warmup_fraction
        if self.schedule == "constant_with_warmup":
            return 1.0
        decay = (progress - self.warmup_fraction) / (1.0 - self.warmup_fraction)
        if self.schedule == "linear":
            return 1.0 - decay
        return 0.5 * (1.0 + math.cos(math.pi * decay))

    def restore(self, checkpoint: str | os.PathLike) -> None:
        """Continue the budget of the run that wrote `checkpoint` (no-op when it holds no budget state)."""
        path = Path(checkpoint) / BUDGET_STATE_FILE
        if path.exists():
            self.elapsed_before = float(json.loads(path.read_text())["elapsed_seconds"])

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()
        self.spent = False
        self.agreed_elapsed = self.elapsed_before

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.agree is not None:
            self.agreed_elapsed = self.agree(self.elapsed())
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.spent:
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                (folder / BUDGET_STATE_FILE).write_text(json.dumps({"elapsed_seconds": self.elapsed()}))
        return control


__all__ = ["WallClockBudget", "BUDGET_STATE_FILE"]
