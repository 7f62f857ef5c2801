"""The loop every trainer runs (`train`, `train-cloob`, `train-ae`): steps until `n_batches` or the time budget
(`max_minutes`), a progress bar, and a checkpoint when the user presses Ctrl-C or a scheduler sends SIGTERM/SIGUSR1
(preemption.py: the signal waits for the step, and its checkpoint write, to finish; then the loop saves and raises
`Preempted`).

A trainer gives `train_step() -> logs` (`take_step` may guard it), `after_step(logs) -> progress-bar postfix` (its logging and checkpoints on
their schedules), `save()`, and may override `time_is_up` (several processes decide together), `at_deadline`
(what the last step of a time budget writes), `stop_requested` (several processes agree on a signal one of them got)
and `end_of_loop` (closing its logs). `save()` must write nothing when the step's checkpoint exists.
"""

from __future__ import annotations

import math
import time
from typing import Any, ClassVar

from tqdm.auto import tqdm

from cclddg import preemption

ESTIMATE_AFTER = 20  # steps of this session after which the loop prints how long the rest will take


class TrainingLoop:
    DESC: ClassVar[str] = "train"  # the progress bar's label

    cfg: Any  # has n_batches and max_minutes
    step: int
    show_progress: bool
    is_main: bool = True  # the process that reports (several processes: rank 0)

    # ---- what a trainer gives ----------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        raise NotImplementedError

    def take_step(self) -> dict[str, float]:
        """The loop's step: `train_step`, which a trainer may wrap (e.g. to turn running out of memory into advice)."""
        return self.train_step()

    def after_step(self, logs: dict[str, float]) -> dict[str, str] | None:
        """Log and save on the trainer's schedule; returns values for the progress bar (or None)."""
        raise NotImplementedError

    def save(self) -> None:
        raise NotImplementedError

    def time_is_up(self, deadline: float) -> bool:
        return time.monotonic() > deadline

    def stop_requested(self, here: bool) -> bool:
        """Whether to stop after this step, given whether a stop signal reached this process."""
        return here

    def at_deadline(self) -> None:
        """The time budget ended the run before this step (the run's end follows)."""

    def end_of_loop(self) -> None:
        """After the loop, however it ended."""

    # ---- the loop ----------------------------------------------------------------------------------
    def run_loop(self) -> None:
        cfg = self.cfg
        deadline = time.monotonic() + cfg.max_minutes * 60 if cfg.max_minutes else math.inf
        bar = tqdm(total=cfg.n_batches, initial=self.step, desc=self.DESC, disable=not self.show_progress,
                   dynamic_ncols=True)
        try:
            with preemption.deferred():
                self._steps(bar, deadline)
        except KeyboardInterrupt:  # Ctrl-C (at once) or a stop signal (after a step): keep the step reached
            bar.close()
            if self.step > 0:
                with preemption.deferred():  # a signal during this write waits for it
                    self.save()
            raise
        finally:
            bar.close()
            self.end_of_loop()

    def _steps(self, bar, deadline: float) -> None:
        cfg = self.cfg
        start, first = time.monotonic(), self.step
        while self.step < cfg.n_batches:
            if self.time_is_up(deadline):
                self.at_deadline()
                break
            logs = self.take_step()
            bar.update(1)
            if self.step - first == ESTIMATE_AFTER and self.step < cfg.n_batches and self.is_main:
                rate = ESTIMATE_AFTER / max(time.monotonic() - start, 1e-9)
                bar.write(estimate_line(self.DESC, rate, cfg.n_batches - self.step, cfg.max_minutes))
            postfix = self.after_step(logs)
            if postfix:
                bar.set_postfix(postfix)
            if self.stop_requested(preemption.pending() is not None):
                raise preemption.consume()


def estimate_line(desc: str, steps_per_s: float, remaining: int, max_minutes: float = 0.0) -> str:
    """One line: the measured speed and how long the remaining steps will take (and whether a time budget ends
    the run first)."""
    seconds = remaining / steps_per_s
    line = f"{desc}: {steps_per_s:.2f} steps/s; the remaining {remaining} steps take about {_duration(seconds)}"
    if max_minutes and seconds > max_minutes * 60:
        line += f" (the --max_minutes {max_minutes:g} budget stops it first)"
    return line


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
