"""The generator run's log, a part the trainer uses: scalars averaged between records, the trackers (log.jsonl,
TensorBoard, W&B; opened by the main process when first used) and the note of what a --resume changed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

from cclddg.objectives.base import StepLogs
from cclddg.training.trackers import Trackers, open_trackers


class RunLog:
    """Where the main process reports a run; the other processes' RunLog writes nothing.

    `add` collects each step's scalars; `window_means` gives their means since the last record (with the samples/s
    of those steps) and starts a new window. A resumed run's trackers first drop what was logged after its
    checkpoint (`resume_step`), and the first record notes the optimisation settings the --resume changed."""

    def __init__(self, out: Path, config: Mapping[str, Any], main: bool, tensorboard: bool, wandb_project: str | None,
                 resume_step: int | None = None, resumed_changes: dict[str, tuple[Any, Any]] | None = None):
        self.out, self.config, self.main = out, dict(config), main
        self.tensorboard, self.wandb_project = tensorboard, wandb_project
        self.resume_step = resume_step
        self.resumed_changes = dict(resumed_changes or {})
        self.trackers: Trackers | None = None
        self.window, self.since, self.seen = StepLogs(), time.perf_counter(), 0

    def add(self, logs: dict[str, float], examples: int) -> None:
        self.window.add(logs)
        self.seen += examples

    @property
    def pending(self) -> bool:
        """Whether steps were taken since the last record."""
        return self.seen > 0

    def window_means(self) -> dict[str, float]:
        """The means of the window's scalars and its samples/s; the next window starts now."""
        logs = self.window.means()
        logs["samples_per_s"] = self.seen / max(time.perf_counter() - self.since, 1e-9)
        self.window, self.since, self.seen = StepLogs(), time.perf_counter(), 0
        return logs

    def open(self) -> Trackers | None:
        """The trackers (main process only), opened when first used."""
        if self.trackers is None and self.main:
            self.trackers = open_trackers(self.out, self.config, resume_step=self.resume_step,
                                          tensorboard=self.tensorboard, wandb_project=self.wandb_project)
            if self.resumed_changes:  # what this --resume changed, kept beside the losses it explains
                self.trackers.note({"resumed_with": {k: new for k, (_, new) in self.resumed_changes.items()},
                                    "was": {k: old for k, (old, _) in self.resumed_changes.items()}},
                                   self.resume_step or 0)
                self.resumed_changes = {}
        return self.trackers

    def scalars(self, values: dict[str, Any], step: int) -> None:
        if self.open() is not None:
            self.trackers.log_scalars(values, step=step)

    def images(self, grids: dict[str, Any], step: int) -> None:
        if self.open() is not None:
            self.trackers.log_images(grids, step=step)

    def close(self, step: int) -> None:
        """Close the trackers; a later `open` (the loop run again) keeps what was logged up to `step`."""
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None
        self.resume_step = step
