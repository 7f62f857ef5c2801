"""The sampling loops, one function each, with one signature (k-diffusion's shape):

    sampler(model, x, schedule, *, steps, rng, callback, **options) -> the sample

`model(x, t, z) -> prediction` is a denoiser: a generator's x̂_0 (DDGAN) or a diffusion model's ε̂, with the
condition and classifier-free guidance already bound by `Guided`. `x` is the starting noise x_T (the caller
draws it, so that one generator seeds everything in order). `callback(info)`, when given, sees every step:
{"i", "t", "x", "prediction"}. The maths is docs/DESIGN.md's "Sampling" and "The DDPM baseline".

| name    | network calls          | model predicts | options |
|---------|------------------------|----------------|---------|
| `ddgan` | T (the schedule's)     | x̂_0            | `step_kind` (posterior or renoise), `z_dim`, `z_rng` |
| `ddpm`  | T (every step)         | ε̂              | `clip_x0` |
| `ddim`  | `steps` (evenly spaced) | ε̂              | `clip_x0` (η = 0: deterministic) |
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
from torch import Tensor

from cclddg import diffusion
from cclddg.conditioning.base import null_like
from cclddg.diffusion import Schedule, randn
from cclddg.objectives.ddgan import fake_step
from cclddg.objectives.diffusion import DEFAULT_DDIM_STEPS

Callback = Callable[[dict[str, Any]], None]


class Denoiser(Protocol):
    def __call__(self, x: Tensor, t: Tensor, z: Tensor | None = None) -> Tensor: ...


class Guided:
    """A conditional network as a denoiser with classifier-free guidance `scale` (1: the plain conditional model,
    one call; 0: the unconditional one). `uncond` replaces the null condition as the point guidance pushes away
    from (a negative prompt). `batched` runs both predictions as one forward of twice the rows."""

    def __init__(self, model: torch.nn.Module, cond: Tensor | None = None, scale: float = 1.0,
                 uncond: Tensor | None = None, batched: bool = True):
        self.model, self.cond, self.scale, self.batched = model, cond, float(scale), batched
        self.null = None if cond is None else (null_like(cond) if uncond is None else uncond.expand_as(cond).to(cond))

    def __call__(self, x: Tensor, t: Tensor, z: Tensor | None = None) -> Tensor:
        model, cond = self._model(x.dtype), self.cond
        if cond is None or self.scale == 1.0:
            return model(x, t, cond, z)
        if self.scale == 0.0:
            return model(x, t, self.null, z)
        if self.batched:
            zz = None if z is None else torch.cat([z, z])
            pred_c, pred_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, self.null]), zz).chunk(2)
        else:
            pred_c, pred_u = model(x, t, cond, z), model(x, t, self.null, z)
        return pred_u + self.scale * (pred_c - pred_u)

    def _model(self, dtype: torch.dtype):
        """The network, called in its own dtype (an exported pipeline's torch_dtype) with float32 steps around it."""
        own = getattr(self.model, "dtype", dtype)
        if own == dtype:
            return self.model

        def call(x: Tensor, t: Tensor, cond: Tensor | None, z: Tensor | None) -> Tensor:
            cast = [None if v is None else v.to(own) for v in (x, cond, z)]
            return self.model(cast[0], t, cast[1], cast[2]).to(dtype)
        return call


def _steps_tensor(step: int, like: Tensor) -> Tensor:
    return torch.full((like.shape[0],), step, dtype=torch.long, device=like.device)


@torch.no_grad()
def sample_ddgan(model: Denoiser, x: Tensor, schedule: Schedule, *, steps: int | None = None,
                 rng: torch.Generator | None = None, callback: Callback | None = None,
                 step_kind: str = "posterior", z_dim: int = 0, z_rng: torch.Generator | None = None) -> Tensor:
    """For t = T..1: x̂_0 = model(x_t, t, z) with a fresh z, then x_{t-1} by the training's fake step; returns the
    last x̂_0. `z_rng` draws the z's (default `rng`), so z alone can be varied with the rest fixed."""
    if steps not in (None, schedule.n_steps):
        raise ValueError(f"a DDGAN samples with its schedule's {schedule.n_steps} steps, not {steps}")
    sched = schedule.to(x.device)
    x0 = x
    for i, step in enumerate(range(sched.n_steps, 0, -1)):
        t = _steps_tensor(step, x)
        z = randn((x.shape[0], z_dim), rng if z_rng is None else z_rng, x.device) if z_dim else None
        x0 = model(x, t, z)
        if callback is not None:
            callback({"i": i, "t": step, "x": x, "prediction": x0})
        if step > 1:
            x = fake_step(sched, step_kind, x, x0, t, noise=randn(tuple(x.shape), rng, x.device))
    return x0


@torch.no_grad()
def sample_ddpm(model: Denoiser, x: Tensor, schedule: Schedule, *, steps: int | None = None,
                rng: torch.Generator | None = None, callback: Callback | None = None,
                clip_x0: float | None = 1.0) -> Tensor:
    """Ancestral DDPM over every step of the schedule."""
    if steps not in (None, schedule.n_steps):
        raise ValueError(f"DDPM samples with every one of the schedule's {schedule.n_steps} steps, not {steps}")
    sched = schedule.to(x.device)
    for i, step in enumerate(range(sched.n_steps, 0, -1)):
        t = _steps_tensor(step, x)
        eps = model(x, t)
        if callback is not None:
            callback({"i": i, "t": step, "x": x, "prediction": eps})
        x = diffusion.ddpm_step(sched, x, t, eps, noise=randn(tuple(x.shape), rng, x.device), clip_x0=clip_x0)
    return x


@torch.no_grad()
def sample_ddim(model: Denoiser, x: Tensor, schedule: Schedule, *, steps: int | None = None,
                rng: torch.Generator | None = None, callback: Callback | None = None,
                clip_x0: float | None = 1.0) -> Tensor:
    """Deterministic DDIM (η = 0) over `steps` evenly spaced steps (default: min(50, T)); `rng` is unused."""
    sched = schedule.to(x.device)
    grid = diffusion.ddim_timesteps(sched.n_steps, steps or min(DEFAULT_DDIM_STEPS, sched.n_steps))
    for i, step in enumerate(grid):
        t, t_prev = _steps_tensor(step, x), _steps_tensor(grid[i + 1] if i + 1 < len(grid) else 0, x)
        eps = model(x, t)
        if callback is not None:
            callback({"i": i, "t": step, "x": x, "prediction": eps})
        x = diffusion.ddim_step(sched, x, t, t_prev, eps, eta=0.0, clip_x0=clip_x0)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {"ddgan": sample_ddgan, "ddpm": sample_ddpm, "ddim": sample_ddim}
