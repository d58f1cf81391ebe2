"""Ctrl-C during training: finish the current optimizer step, save a checkpoint, then stop.

A run stopped this way resumes from that checkpoint (`trainer.train(resume_from_checkpoint=True)`,
`dspark train --resume`) with its optimizer, scheduler, data order and wall-clock budget, instead of losing
everything since the last scheduled save. A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

from transformers import Trainer, TrainerCallback


class _InterruptRequest(TrainerCallback):
    """Turns the first SIGINT into "save a checkpoint and stop" at the next step end."""

    def __init__(self):
        self.requested = False
        self.saved = False

    def handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "Interrupted: saving a checkpoint after the current step (Ctrl-C again stops at once).",
            file=sys.stderr,
        )

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self.saved = self.requested
        return control


def train_saving_on_interrupt(trainer: Trainer, **train_kwargs: Any) -> Any:
    """`trainer.train(**train_kwargs)`, where Ctrl-C (SIGINT) saves a checkpoint in `trainer.args.output_dir`
    after the current optimizer step and then raises KeyboardInterrupt. Outside the main thread, where no
    signal handler can be installed, it is plain `trainer.train`."""
    if threading.current_thread() is not threading.main_thread():
        return trainer.train(**train_kwargs)
    request = _InterruptRequest()
    trainer.add_callback(request)
    previous = signal.signal(signal.SIGINT, request.handle)
    try:
        output = trainer.train(**train_kwargs)
    finally:
        signal.signal(signal.SIGINT, previous)
        trainer.remove_callback(request)
    if request.requested:
        where = f"saved at step {trainer.state.global_step}" if request.saved else "not saved"
        raise KeyboardInterrupt(f"training interrupted; checkpoint {where}")
    return output


__all__ = ["train_saving_on_interrupt"]
