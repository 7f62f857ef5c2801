"""Noise schedules, forward noising, the Gaussian posterior and DDPM/DDIM steps.

One convention everywhere (docs/DESIGN.md, "The maths"): steps are ``t = 1..T`` and every
schedule tensor has length ``T + 1`` so it is indexed by ``t`` directly, with
``betas[0] = 0`` and ``alphas_cumprod[0] = 1`` (so ``x_0`` is the clean sample).

- ``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)``
- ``q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)``
- ``q(x_{t-1} | x_t, x_0) = N(coef1_t x_0 + coef2_t x_t, var_t I)``, ``var_1 = 0``.

Step tensors ``t`` are integer tensors of shape ``(B,)`` (a Python int or a 0-d tensor is
broadcast to the batch). Schedule coefficients are gathered on ``x``'s device and dtype;
call ``Schedule.to(device)`` once to avoid a small host-to-device copy per call.
Range checks on ``t`` run only for CPU tensors, so GPU loops never wait on a sync.

Every function that draws noise takes an optional ``torch.Generator``; noise is drawn on
the generator's device and moved to ``x``'s, so a CPU generator is reproducible on GPU.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from cclddg.errors import UserError

SCHEDULE_KINDS = ("seed", "vp", "linear")

_DEFAULT_BETAS = {"seed": (0.3, 0.9), "vp": (0.1, 20.0), "linear": (1e-4, 0.02)}
_VP_EPS = 1e-3


@dataclass(frozen=True, eq=False)
class Schedule:
    """A noise schedule: float32 tensors of length ``T + 1`` indexed by the step ``t``.

    ``eq=False`` because tensor fields make generated equality ambiguous.
    """

    kind: str
    n_steps: int
    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor

    def to(self, device: torch.device | str) -> Schedule:
        """Return a copy whose tensors live on ``device`` (sampling loops gather there)."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)

    @property
    def device(self) -> torch.device:
        """Where the schedule's tensors live."""
        return self.betas.device


# --------------------------------------------------------------------------- schedules


def make_schedule(
    kind: str,
    n_steps: int,
    beta_min: float | None = None,
    beta_max: float | None = None,
) -> Schedule:
    """Build a schedule of ``n_steps`` steps; ``beta_min``/``beta_max`` override the defaults.

    - ``seed``: ``betas = linspace(beta_min, beta_max, T)``, defaults 0.3, 0.9.
    - ``vp``: DDGAN's discretised VP-SDE with ``s_i = eps + (1 - eps) i / T`` (``eps = 1e-3``)
      and ``var(s) = 1 - exp(-s^2 (b_max - b_min) / 2 - s b_min)``, defaults 0.1, 20 (here
      ``beta_min``/``beta_max`` are ``b_min``/``b_max``). We take
      ``abar_t = (1 - var(s_t)) / (1 - var(s_0))``, which is what DDGAN's cumulative product
      of ``1 - beta`` from ``t = 1`` gives, so ``abar_0 = 1`` exactly, and
      ``beta_t = 1 - abar_t / abar_{t-1}``.
    - ``linear`` (DDPM baseline): ``betas = linspace(1e-4, 0.02, T)``; T is usually 1000.
    """
    if kind not in SCHEDULE_KINDS:
        raise UserError(f"unknown schedule kind {kind!r}; choose one of {', '.join(SCHEDULE_KINDS)}")
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise UserError(f"n_steps must be an integer >= 1, got {n_steps!r}")
    lo, hi = _beta_range(kind, beta_min, beta_max)
    if kind == "vp":
        betas = _vp_betas(n_steps, lo, hi)
    else:
        betas = torch.linspace(lo, hi, n_steps, dtype=torch.float64)
    _check_betas(kind, betas, lo, hi)
    return _schedule_from_betas(kind, betas)


def _beta_range(kind: str, beta_min: float | None, beta_max: float | None) -> tuple[float, float]:
    """Fill in the kind's defaults and reject non-finite overrides."""
    default_lo, default_hi = _DEFAULT_BETAS[kind]
    lo = default_lo if beta_min is None else float(beta_min)
    hi = default_hi if beta_max is None else float(beta_max)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise UserError(f"beta_min and beta_max must be finite numbers, got {beta_min!r}, {beta_max!r}")
    return lo, hi


def _vp_betas(n_steps: int, b_min: float, b_max: float) -> torch.Tensor:
    """Betas (length T, float64) of DDGAN's discretised VP-SDE."""
    i = torch.arange(n_steps + 1, dtype=torch.float64)
    s = _VP_EPS + (1.0 - _VP_EPS) * i / n_steps
    log_one_minus_var = -0.5 * s**2 * (b_max - b_min) - s * b_min
    log_abar = log_one_minus_var - log_one_minus_var[0]
    return -torch.expm1(log_abar[1:] - log_abar[:-1])


def _check_betas(kind: str, betas: torch.Tensor, lo: float, hi: float) -> None:
    """Every beta must lie in (0, 1): 0 makes the posterior degenerate, 1 erases the signal."""
    if bool(((betas <= 0) | (betas >= 1) | ~torch.isfinite(betas)).any()):
        raise UserError(
            f"schedule {kind!r} with beta_min={lo}, beta_max={hi} gives betas outside (0, 1) "
            f"(range {betas.min().item():.3g}..{betas.max().item():.3g}); pick values that keep every beta in (0, 1)"
        )


def _schedule_from_betas(kind: str, betas_1_to_T: torch.Tensor) -> Schedule:
    """Derive every coefficient in float64 from betas_1..T, then store float32, indexed by t."""
    n_steps = betas_1_to_T.numel()
    zero = torch.zeros(1, dtype=torch.float64)
    betas = torch.cat([zero, betas_1_to_T])
    abar = torch.cumprod(1.0 - betas, dim=0)  # abar[0] = 1 exactly
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    one_minus = 1.0 - abar
    safe = torch.where(one_minus > 0, one_minus, torch.ones_like(one_minus))  # t = 0 only
    var = torch.where(one_minus > 0, betas * (1.0 - abar_prev) / safe, zero)
    coef1 = torch.where(one_minus > 0, betas * abar_prev.sqrt() / safe, torch.ones_like(abar))
    coef2 = torch.where(one_minus > 0, (1.0 - abar_prev) * (1.0 - betas).sqrt() / safe, zero)
    return Schedule(
        kind=kind,
        n_steps=n_steps,
        betas=_f32(betas),
        alphas_cumprod=_f32(abar),
        sqrt_alphas_cumprod=_f32(abar.sqrt()),
        sqrt_one_minus_alphas_cumprod=_f32(one_minus.sqrt()),
        posterior_variance=_f32(var),
        posterior_log_variance_clipped=_f32(_clipped_log(var, betas)),
        posterior_mean_coef1=_f32(coef1),
        posterior_mean_coef2=_f32(coef2),
    )


def _clipped_log(var: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """log of the posterior variance, with the zeros at t = 0, 1 replaced by var_2 (DDPM's clip).

    With T = 1 there is no var_2, so beta_1 stands in; the value only matters to callers that
    use it at t = 1, where ``posterior_sample`` adds no noise anyway.
    """
    floor = var[2] if var.numel() > 2 else betas[1]
    clipped = var.clone()
    clipped[:2] = floor
    return clipped.log()


def _f32(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float32)


# --------------------------------------------------------------------------- helpers


def _steps(s: Schedule, t: torch.Tensor | int, x: torch.Tensor, lo: int, name: str = "t") -> torch.Tensor:
    """Validate ``t`` (values in lo..T) and return it as a long tensor (B,) on x's device. A bad ``t`` or tensor is
    a caller's mistake, not a user's: TypeError/ValueError (with a traceback), not UserError."""
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension, got a 0-d tensor")
    batch = x.shape[0]
    if isinstance(t, bool):
        raise TypeError(f"{name} must be an integer step or a LongTensor of shape ({batch},), got a bool")
    if isinstance(t, int):
        t = torch.full((batch,), t, dtype=torch.long)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an integer step or a LongTensor of shape ({batch},), got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer steps, got dtype {t.dtype}")
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) to match the batch, got {tuple(t.shape)}")
    if t.device.type == "cpu" and batch > 0:
        t_min, t_max = int(t.min()), int(t.max())
        if t_min < lo or t_max > s.n_steps:
            raise ValueError(f"{name} must lie in {lo}..{s.n_steps}, got values in {t_min}..{t_max}")
    return t.to(device=x.device, dtype=torch.long)


def _at(v: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Gather v[t] and shape it (B, 1, ..., 1) to broadcast against x, in x's dtype."""
    out = v.to(device=x.device)[t].to(dtype=x.dtype)
    return out.reshape((x.shape[0],) + (1,) * (x.dim() - 1))


def _noise(x: torch.Tensor, noise: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    """Use the given noise (shape-checked) or draw N(0, I) like x from the generator."""
    if noise is not None:
        if noise.shape != x.shape:
            raise ValueError(f"noise must have the shape of x {tuple(x.shape)}, got {tuple(noise.shape)}")
        return noise.to(device=x.device, dtype=x.dtype)
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def randn(shape: tuple[int, ...], rng: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    """Gaussian noise drawn on the generator's device, so a CPU generator gives the same images on any device."""
    gen_device = rng.device if rng is not None else device
    return torch.randn(shape, generator=rng, device=gen_device).to(device)


def _same_shape(a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{b_name} must have the shape of {a_name} {tuple(a.shape)}, got {tuple(b.shape)}")


def _clip(x0: torch.Tensor, clip_x0: float | None) -> torch.Tensor:
    """Clamp the x0 prediction to [-clip_x0, clip_x0] when asked (pixels live in [-1, 1])."""
    if clip_x0 is None:
        return x0
    if not clip_x0 > 0:
        raise ValueError(f"clip_x0 must be a positive number or None, got {clip_x0!r}")
    return x0.clamp(-clip_x0, clip_x0)


# --------------------------------------------------------------------------- forward process


def q_sample(
    s: Schedule,
    x0: torch.Tensor,
    t: torch.Tensor | int,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw x_t ~ q(x_t | x_0) in one jump; t may be 0 (returns x0)."""
    t = _steps(s, t, x0, lo=0)
    eps = _noise(x0, noise, generator)
    return _at(s.sqrt_alphas_cumprod, t, x0) * x0 + _at(s.sqrt_one_minus_alphas_cumprod, t, x0) * eps


def q_step(
    s: Schedule,
    x_prev: torch.Tensor,
    t: torch.Tensor | int,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw x_t ~ q(x_t | x_{t-1}): one forward step, used to build the training pair."""
    t = _steps(s, t, x_prev, lo=1)
    eps = _noise(x_prev, noise, generator)
    beta = _at(s.betas, t, x_prev)
    return (1.0 - beta).sqrt() * x_prev + beta.sqrt() * eps


def q_pair(
    s: Schedule,
    x0: torch.Tensor,
    t: torch.Tensor | int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The discriminator's real pair: x_{t-1} ~ q(x_{t-1} | x_0), then x_t ~ q(x_t | x_{t-1})."""
    t = _steps(s, t, x0, lo=1)
    x_prev = q_sample(s, x0, t - 1, generator=generator)
    return x_prev, q_step(s, x_prev, t, generator=generator)


# --------------------------------------------------------------------------- posterior


def posterior_mean_variance(
    s: Schedule, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor | int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0); variance is 0 at t = 1.

    Variance and log-variance are shaped (B, 1, ..., 1) to broadcast against x.
    """
    _same_shape(x_t, x0, "x_t", "x0")
    t = _steps(s, t, x_t, lo=1)
    mean = _at(s.posterior_mean_coef1, t, x_t) * x0 + _at(s.posterior_mean_coef2, t, x_t) * x_t
    return mean, _at(s.posterior_variance, t, x_t), _at(s.posterior_log_variance_clipped, t, x_t)


def posterior_sample(
    s: Schedule,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor | int,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw x_{t-1} ~ q(x_{t-1} | x_t, x_0): DDGAN's fake step; no noise is added at t = 1."""
    mean, var, _ = posterior_mean_variance(s, x_t, x0, t)
    return mean + var.sqrt() * _noise(x_t, noise, generator)


def renoise(
    s: Schedule,
    x0: torch.Tensor,
    t: torch.Tensor | int,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw x_{t-1} ~ q(x_{t-1} | x_0), ignoring x_t: the seed's fake step (x0 itself at t = 1)."""
    t = _steps(s, t, x0, lo=1)
    return q_sample(s, x0, t - 1, noise=noise, generator=generator)


# --------------------------------------------------------------------------- eps <-> x0


def predict_x0_from_eps(s: Schedule, x_t: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor) -> torch.Tensor:
    """Invert q_sample for x0 given the noise: x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    _same_shape(x_t, eps, "x_t", "eps")
    t = _steps(s, t, x_t, lo=1)
    return (x_t - _at(s.sqrt_one_minus_alphas_cumprod, t, x_t) * eps) / _at(s.sqrt_alphas_cumprod, t, x_t)


def predict_eps_from_x0(s: Schedule, x_t: torch.Tensor, t: torch.Tensor | int, x0: torch.Tensor) -> torch.Tensor:
    """Invert q_sample for the noise given x0: eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""
    _same_shape(x_t, x0, "x_t", "x0")
    t = _steps(s, t, x_t, lo=1)
    return (x_t - _at(s.sqrt_alphas_cumprod, t, x_t) * x0) / _at(s.sqrt_one_minus_alphas_cumprod, t, x_t)


# --------------------------------------------------------------------------- samplers


def ddpm_step(
    s: Schedule,
    x_t: torch.Tensor,
    t: torch.Tensor | int,
    eps: torch.Tensor,
    noise: torch.Tensor | None = None,
    clip_x0: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Ancestral DDPM step: predict x0 from eps (optionally clipped), then sample the posterior."""
    x0 = _clip(predict_x0_from_eps(s, x_t, t, eps), clip_x0)
    return posterior_sample(s, x_t, x0, t, noise=noise, generator=generator)


def ddim_step(
    s: Schedule,
    x_t: torch.Tensor,
    t: torch.Tensor | int,
    t_prev: torch.Tensor | int,
    eps: torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    clip_x0: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DDIM step from t to an earlier t_prev (0 allowed); eta = 0 is deterministic, 1 is DDPM-like.

    With clip_x0 the noise direction is recomputed from the clipped x0 so the step stays
    consistent with it. No noise is drawn when eta = 0.
    """
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    t = _steps(s, t, x_t, lo=1)
    t_prev = _steps(s, t_prev, x_t, lo=0, name="t_prev")
    if t.device.type == "cpu" and bool((t_prev >= t).any()):
        raise ValueError("t_prev must be smaller than t for every sample")
    x0 = predict_x0_from_eps(s, x_t, t, eps)
    if clip_x0 is not None:
        x0 = _clip(x0, clip_x0)
        eps = predict_eps_from_x0(s, x_t, t, x0)
    abar_t = _at(s.alphas_cumprod, t, x_t)
    abar_prev = _at(s.alphas_cumprod, t_prev, x_t)
    out = abar_prev.sqrt() * x0
    if eta == 0:
        return out + (1.0 - abar_prev).sqrt() * eps
    sigma2 = eta**2 * (1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)
    direction = (1.0 - abar_prev - sigma2).clamp(min=0.0).sqrt()
    return out + direction * eps + sigma2.sqrt() * _noise(x_t, noise, generator)


def ddim_timesteps(n_steps: int, n: int) -> list[int]:
    """n evenly spaced steps from T down to 1 (first is T, distinct); pair each with the next, then 0."""
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise UserError(f"n_steps (T) must be an integer >= 1, got {n_steps!r}")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= n_steps:
        raise UserError(f"the number of DDIM steps must be an integer in 1..{n_steps}, got {n!r}")
    if n == 1:
        return [n_steps]
    # round(i (T-1) / (n-1)) in exact integer arithmetic, so the last step is exactly 1
    return [n_steps - (2 * i * (n_steps - 1) + (n - 1)) // (2 * (n - 1)) for i in range(n)]
