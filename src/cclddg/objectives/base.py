"""What an objective is (`Objective`), what the trainer lends its step (`TrainingRun`), and the step's logs.

An objective owns the networks it trains (built from the run's config), its training step and the names of its
loss terms, and how its model samples (the loop of `samplers.py` it names, and that loop's options). Everything
else about a run (data, conditions, optimisers, checkpoints, logging) is the trainer's, and the same for all.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from cclddg.config import TrainConfig
from cclddg.diffusion import Schedule
from cclddg.errors import UserError
from cclddg.models import Discriminator, UNet

Micro = list[tuple[Tensor, "Tensor | None"]]  # one step's micro-batches: (x_0, condition or None)


def sample_steps(batch: int, n_steps: int, device: torch.device) -> Tensor:
    """t ~ U{1..T}."""
    return torch.randint(1, n_steps + 1, (batch,), device=device)


class StepLogs:
    """Scalars averaged over micro-batches or over the steps between two log records (running sums: a long
    interval between records costs no memory)."""

    def __init__(self):
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def add(self, logs: dict[str, float]) -> None:
        for key, value in logs.items():
            self._sums[key] = self._sums.get(key, 0.0) + float(value)
            self._counts[key] = self._counts.get(key, 0) + 1

    def finite(self, keys: list[str] | tuple[str, ...]) -> bool:
        """Whether every value added under these keys was finite (a NaN or inf makes its sum non-finite)."""
        return all(math.isfinite(self._sums.get(key, 0.0)) for key in keys)

    def means(self) -> dict[str, float]:
        return {k: total / self._counts[k] for k, total in self._sums.items()}


class Optimised(Protocol):
    """One net's optimiser as a step sees it (training/optimisation.NetOptimizer)."""

    scaler: Any

    def backward(self, loss: Tensor, accumulated: int) -> None: ...


class TrainingRun(Protocol):
    """What the trainer lends an objective's step: the run's settings and state, its nets and their optimisers,
    and the parts of a step that are the same for every objective."""

    cfg: TrainConfig
    schedule: Schedule
    step: int  # the steps taken so far
    gen: torch.nn.Module  # the generator as it trains (data parallel where several processes run)
    disc: torch.nn.Module | None  # the discriminator as it trains, if the objective has one
    disc_frozen: torch.nn.Module | None  # the same discriminator, outside data parallel: G's loss looks through it
    opt_g: Optimised
    opt_d: Optimised | None

    def autocast(self) -> contextlib.AbstractContextManager: ...

    def sync_on_last(self, model: torch.nn.Module, i: int, k: int) -> contextlib.AbstractContextManager: ...

    def update(self, part: Optimised, model: torch.nn.Module, losses_finite: bool, name: str) -> float: ...

    def split_cond(self, cond: Tensor | None) -> tuple[Tensor | None, Tensor | None]: ...


class Objective:
    """One training objective, registered by name in `objectives.OBJECTIVES` (`cfg.objective`)."""

    name: ClassVar[str]
    samplers: ClassVar[tuple[str, ...]]  # the loops of samplers.SAMPLERS it samples with; the first is the default
    takes_z: ClassVar[bool] = False  # the generator takes a latent z (of cfg.z_dim)
    predicts_x0: ClassVar[bool] = False  # the network predicts x̂_0 (the trainer then logs a reconstruction grid)
    shown: ClassVar[tuple[str, ...]] = ()  # the logged scalars the progress bar shows

    def check(self, cfg: TrainConfig) -> None:
        """Refuse settings this objective cannot train with (one line, before anything is built)."""

    def z_dim(self, cfg: TrainConfig) -> int:
        """The width of the generator's latent z (0: none)."""
        return cfg.z_dim if self.takes_z else 0

    def build(self, cfg: TrainConfig, cond_dim: int, cond_scale: float) -> tuple[UNet, Discriminator | None]:
        """(generator, discriminator or None), freshly initialised from the current torch seed, in that order."""
        raise NotImplementedError

    def train_step(self, run: TrainingRun, micro: Micro) -> dict[str, float]:
        """One optimisation step of every net on this step's micro-batches; returns the step's logged scalars."""
        raise NotImplementedError

    def sampler(self, n_steps: int, name: str | None = None, steps: int | None = None) -> tuple[str, int]:
        """(the sampler, its network calls) for a model trained with `n_steps`: `name` and `steps` as asked
        (None: the default). A sampler or a step count this objective cannot sample with is one line."""
        name = name or self.samplers[0]
        if name not in self.samplers:
            raise UserError(f"a {self.name} model samples with {' or '.join(self.samplers)}, not {name!r}")
        return name, self.calls(name, n_steps, steps)

    def calls(self, sampler: str, n_steps: int, steps: int | None) -> int:
        """The network calls of `sampler` (one of `samplers`) asked for `steps` (None: its default)."""
        raise NotImplementedError

    def sampler_options(self, step_kind: str, z_dim: int, z_rng: torch.Generator | None) -> dict[str, Any]:
        """The keyword options this objective's loops take beyond the common signature."""
        return {}

    def timesteps(self, n_steps: int, num_inference_steps: int | None = None) -> list[int]:
        """The steps a diffusers-style scheduler (`scheduler.CCLDDGScheduler`) steps through, from T down, when
        asked for `num_inference_steps` (None: the default sampler's)."""
        raise NotImplementedError

    def scheduler_step(self, schedule: Schedule, timesteps: list[int], model_output: Tensor, t: int, sample: Tensor,
                       generator: torch.Generator | None, step_kind: str) -> tuple[Tensor, Tensor]:
        """(x_{t-1}, x̂_0): one step of that scheduler from the network's output at t (`timesteps` as above), the
        same step as this objective's sampling loop takes, its noise drawn from `generator` as the loop draws it."""
        raise NotImplementedError
