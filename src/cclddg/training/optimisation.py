"""Optimisation parts of the generator run: one network's optimizer (its warmup schedule and loss scaler with it),
and the policy for a non-finite loss or gradient; and the warmup-cosine learning rate the small trainers
(`train-ae`, `train-prior`) share.

The trainer owns the models and decides when to step; these own how: the update with clipping and the loss
scale, the learning rate in effect, what a checkpoint keeps, and whether a non-finite step stops the run.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from cclddg.config import TrainConfig
from cclddg.errors import TrainingError
from cclddg.training import precision

# --skip_nonfinite gives up after this many skipped updates in a row: the run is diverging, not unlucky.
MAX_SKIPPED_IN_A_ROW = 20


def make_optimizer(cfg: TrainConfig, params, lr: float) -> torch.optim.Optimizer:
    """Adam or AdamW with the fused kernel (one pass over each tensor instead of ~10: the update of the seed
    preset's 190 M parameters took a third of a CPU step with torch's default per-tensor loop), or the
    multi-tensor one where this torch or device has no fused kernel."""
    kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    params = list(params)
    kwargs = dict(lr=lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    try:
        return kind(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # torch < 2.4 on CPU, or a device without the fused kernel
        return kind(params, foreach=True, **kwargs)


def warmup_cosine(lr: float, step: int, warmup: int, total: int, floor: float = 0.0) -> float:
    """The small trainers' learning rate at `step`: a linear warmup over `warmup` steps, then a cosine decay to
    `floor` x `lr` at `total` (short runs learn most per step at a high rate and settle in the decay)."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    progress = min(1.0, step / max(1, total))
    return lr * warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def lr_factor(step: int, warmup: int, decay: int) -> float:
    """The generator's and discriminator's learning rate at `step` over the base rate: `warmup_cosine` with its
    fall to 0 at step `decay` (0: no fall, the warmup alone). The fall is fixed by `decay`, not by the run's
    length, so a run trained in blocks or extended on resume follows one schedule."""
    if decay:
        return warmup_cosine(1.0, step, warmup, decay)
    return min(1.0, (step + 1) / max(1, warmup))


def lr_scheduler(opt: torch.optim.Optimizer, warmup: int, decay: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """`lr_factor`'s schedule on `opt`."""
    return torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(lr_factor, warmup=warmup, decay=decay))


class NetOptimizer:
    """One network's optimizer, learning-rate warmup and loss scaler (fp16), stepped together."""

    def __init__(self, cfg: TrainConfig, params, lr: float, device: torch.device):
        self.opt = make_optimizer(cfg, params, lr)
        self.sched = lr_scheduler(self.opt, cfg.lr_warmup, cfg.lr_decay)
        self.scaler = precision.grad_scaler(cfg.mixed_precision, device)

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def backward(self, loss: torch.Tensor, micro_batches: int) -> None:
        """Gradients of one micro-batch's loss (a mean over the step's micro-batches), loss-scaled."""
        self.scaler.scale(loss / micro_batches).backward()

    def clipped_norm(self, model: torch.nn.Module, max_norm: float) -> float:
        """Unscale the gradients and clip them to `max_norm` (0: no clipping); the norm before clipping."""
        self.scaler.unscale_(self.opt)
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else math.inf))

    def finite(self, losses_finite: bool, norm: float) -> bool:
        """Whether this update may be taken (fp16: non-finite gradients are the loss scale overflowing, which the
        scaler handles by skipping the update and lowering the scale)."""
        return losses_finite and (math.isfinite(norm) or self.scaler.is_enabled())

    def step(self) -> None:
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)

    def drop(self) -> None:
        """Throw this update's gradients away."""
        self.opt.zero_grad(set_to_none=True)
        self.scaler.update()

    def schedule_step(self) -> None:
        with warnings.catch_warnings():  # a step the loss scaler skipped is not a misordered scheduler call
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            self.sched.step()

    def set_lr(self, lr: float) -> None:
        """Make `lr` the base rate (a resumed optimizer state brings the rate it was saved with), keeping the
        warmup's position."""
        self.sched.base_lrs = [lr] * len(self.opt.param_groups)
        for group, factor in zip(self.opt.param_groups, self.sched.lr_lambdas):
            group["initial_lr"] = lr
            group["lr"] = lr * factor(self.sched.last_epoch)

    def state_dict(self, suffix: str) -> dict[str, Any]:
        """The checkpoint's entries, named as checkpoints always named them (opt_g, sched_g, scaler_g ...)."""
        return {f"opt_{suffix}": self.opt.state_dict(), f"sched_{suffix}": self.sched.state_dict(),
                f"scaler_{suffix}": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any], suffix: str) -> None:
        self.opt.load_state_dict(state[f"opt_{suffix}"])
        if state.get(f"sched_{suffix}"):
            self.sched.load_state_dict(state[f"sched_{suffix}"])
        if state.get(f"scaler_{suffix}") and self.scaler.is_enabled():  # a disabled scaler saves an empty state
            self.scaler.load_state_dict(state[f"scaler_{suffix}"])


class NonFinitePolicy:
    """What a non-finite loss or gradient does: stop the run naming the last good checkpoint, or with
    --skip_nonfinite drop the update, until MAX_SKIPPED_IN_A_ROW in a row say the run diverged."""

    def __init__(self, skip: bool, skipped: int = 0):
        self.skip, self.skipped, self.in_a_row = skip, skipped, 0

    def good(self) -> None:
        self.in_a_row = 0

    def bad(self, name: str, step: int, last_checkpoint: Path | None) -> None:
        """A non-finite update of `name` at `step` (counting from 1): raise, or count it as skipped."""
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        if not self.skip:
            raise TrainingError(f"non-finite loss or gradient of {name} at step {step}; {where}. Lower "
                                "--lr_gen/--lr_disc or raise --r1_gamma, then --resume (or --skip_nonfinite)")
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row > MAX_SKIPPED_IN_A_ROW:
            raise TrainingError(f"{self.in_a_row} updates in a row had a non-finite loss or gradient "
                                f"(step {step}): the run diverged; {where}. Lower --lr_gen/--lr_disc "
                                "or raise --r1_gamma, then --resume")
