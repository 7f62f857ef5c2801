"""Closed forms and Monte Carlo checks of cclddg.diffusion against docs/DESIGN.md's maths."""

from __future__ import annotations

import math

import pytest
import torch

from cclddg import diffusion as d
from cclddg.errors import UserError

N_MC = 200_000
SCHEDULES = [("seed", 4), ("seed", 8), ("vp", 4), ("linear", 1000)]
IDS = [f"{k}-T{n}" for k, n in SCHEDULES]


def _mc_steps(s: d.Schedule) -> list[int]:
    """All steps for short schedules; a spread of them for T = 1000 to keep the test fast."""
    if s.n_steps <= 8:
        return list(range(1, s.n_steps + 1))
    return [1, 2, 10, 500, 999, 1000]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _abar(s: d.Schedule, t: int) -> float:
    return float(s.alphas_cumprod.double()[t])


def _assert_gaussian(x: torch.Tensor, mean: float, var: float) -> None:
    """Empirical mean/variance of x match N(mean, var) within ~5 standard errors."""
    n = x.numel()
    mean_tol = 5 * math.sqrt(var / n) + 1e-5
    var_tol = 5 * var * math.sqrt(2 / n) + 1e-6
    assert abs(x.mean().item() - mean) < mean_tol, (x.mean().item(), mean)
    assert abs(x.var().item() - var) < var_tol, (x.var().item(), var)


@pytest.fixture(params=SCHEDULES, ids=IDS)
def sched(request) -> d.Schedule:
    kind, n = request.param
    return d.make_schedule(kind, n)


# --------------------------------------------------------------------------- closed forms


def test_seed_betas_endpoints() -> None:
    s = d.make_schedule("seed", 4)
    assert s.betas[0] == 0
    torch.testing.assert_close(s.betas[1:], torch.tensor([0.3, 0.5, 0.7, 0.9]))
    s = d.make_schedule("seed", 8, beta_min=0.1, beta_max=0.5)
    assert s.betas[1].item() == pytest.approx(0.1) and s.betas[-1].item() == pytest.approx(0.5)


def test_linear_betas_endpoints() -> None:
    s = d.make_schedule("linear", 1000)
    assert s.betas.shape == (1001,)
    assert s.betas[1].item() == pytest.approx(1e-4) and s.betas[1000].item() == pytest.approx(0.02)


def test_vp_alphas_cumprod_formula() -> None:
    T, eps, b_min, b_max = 4, 1e-3, 0.1, 20.0
    s = d.make_schedule("vp", T)

    def one_minus_var(x: float) -> float:
        return math.exp(-0.5 * x**2 * (b_max - b_min) - x * b_min)

    sv = [eps + (1 - eps) * i / T for i in range(T + 1)]
    expected = torch.tensor([one_minus_var(x) / one_minus_var(sv[0]) for x in sv], dtype=torch.float64)
    torch.testing.assert_close(s.alphas_cumprod.double(), expected, rtol=1e-6, atol=1e-9)
    betas = 1 - expected[1:] / expected[:-1]
    torch.testing.assert_close(s.betas[1:].double(), betas, rtol=1e-6, atol=1e-9)


def test_vp_overrides_change_schedule() -> None:
    a = d.make_schedule("vp", 4)
    b = d.make_schedule("vp", 4, beta_min=0.5, beta_max=10.0)
    assert not torch.allclose(a.alphas_cumprod, b.alphas_cumprod)


def test_common_shape_and_monotone(sched: d.Schedule) -> None:
    T = sched.n_steps
    for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_mean_coef1"):
        v = getattr(sched, name)
        assert v.shape == (T + 1,) and v.dtype == torch.float32, name
    assert sched.alphas_cumprod[0].item() == 1.0 and sched.betas[0].item() == 0.0
    assert sched.sqrt_one_minus_alphas_cumprod[0].item() == 0.0
    assert bool((sched.alphas_cumprod[1:] < sched.alphas_cumprod[:-1]).all())
    assert bool(((sched.betas[1:] > 0) & (sched.betas[1:] < 1)).all())
    prod = torch.cumprod(1 - sched.betas.double(), 0)
    torch.testing.assert_close(sched.alphas_cumprod.double(), prod, rtol=1e-5, atol=1e-7)


def test_posterior_coefficients(sched: d.Schedule) -> None:
    b = sched.betas.double()
    a = torch.cumprod(1 - b, 0)  # not the float32 abar: 1 - abar loses digits near abar = 1
    assert sched.posterior_variance[1].item() == 0.0
    t = torch.arange(1, sched.n_steps + 1)
    var = b[t] * (1 - a[t - 1]) / (1 - a[t])
    coef1 = b[t] * a[t - 1].sqrt() / (1 - a[t])
    coef2 = (1 - a[t - 1]) * (1 - b[t]).sqrt() / (1 - a[t])
    torch.testing.assert_close(sched.posterior_variance[t].double(), var, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(sched.posterior_mean_coef1[t].double(), coef1, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(sched.posterior_mean_coef2[t].double(), coef2, rtol=1e-5, atol=1e-8)
    assert sched.posterior_mean_coef1[1].item() == pytest.approx(1.0)
    assert sched.posterior_mean_coef2[1].item() == pytest.approx(0.0, abs=1e-7)
    assert bool(torch.isfinite(sched.posterior_log_variance_clipped).all())
    if sched.n_steps >= 2:
        torch.testing.assert_close(sched.posterior_log_variance_clipped[2:], sched.posterior_variance[2:].log())


def test_to_device_copy() -> None:
    s = d.make_schedule("seed", 4)
    c = s.to("cpu")
    assert c.kind == "seed" and c.n_steps == 4 and c.device.type == "cpu"
    torch.testing.assert_close(c.alphas_cumprod, s.alphas_cumprod)


def test_q_sample_t0_is_identity() -> None:
    s = d.make_schedule("seed", 4)
    x0 = torch.randn(3, 2, 5, 5, generator=_gen())
    torch.testing.assert_close(d.q_sample(s, x0, torch.zeros(3, dtype=torch.long), generator=_gen(1)), x0)
    torch.testing.assert_close(d.renoise(s, x0, torch.ones(3, dtype=torch.long), generator=_gen(1)), x0)


def test_posterior_at_t1_is_deterministic() -> None:
    s = d.make_schedule("seed", 4)
    x0 = torch.randn(3, 2, 4, 4, generator=_gen())
    x1 = d.q_sample(s, x0, 1, generator=_gen(1))
    torch.testing.assert_close(d.posterior_sample(s, x1, x0, 1, generator=_gen(2)), x0)


def test_shapes_broadcast_and_dtype() -> None:
    s = d.make_schedule("seed", 8)
    x0 = torch.randn(4, 3, 6, 6, dtype=torch.float64, generator=_gen())
    t = torch.tensor([1, 3, 5, 8])
    xt = d.q_sample(s, x0, t, generator=_gen(1))
    assert xt.shape == x0.shape and xt.dtype == torch.float64
    mean, var, logvar = d.posterior_mean_variance(s, xt, x0, t)
    assert mean.shape == x0.shape and var.shape == (4, 1, 1, 1) and logvar.shape == (4, 1, 1, 1)


def test_eps_x0_roundtrip(sched: d.Schedule) -> None:
    x0 = torch.randn(6, 3, 4, dtype=torch.float64, generator=_gen())
    eps = torch.randn(6, 3, 4, dtype=torch.float64, generator=_gen(1))
    t = torch.linspace(1, sched.n_steps, 6).round().long()
    xt = d.q_sample(sched, x0, t, noise=eps)
    torch.testing.assert_close(d.predict_eps_from_x0(sched, xt, t, x0), eps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(d.predict_x0_from_eps(sched, xt, t, eps), x0, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- Monte Carlo


def test_q_sample_matches_repeated_q_step(sched: d.Schedule) -> None:
    x0 = torch.full((N_MC,), 0.7, dtype=torch.float64)
    g = _gen(3)
    steps = set(_mc_steps(sched)) if sched.n_steps <= 8 else {1, 2, 10}
    x = x0
    for t in range(1, max(steps) + 1):
        x = d.q_step(sched, x, t, generator=g)
        if t in steps:
            _assert_gaussian(x, math.sqrt(_abar(sched, t)) * 0.7, 1 - _abar(sched, t))


def test_posterior_of_q_sample_is_marginal(sched: d.Schedule) -> None:
    g = _gen(4)
    x0 = torch.full((N_MC,), 0.7, dtype=torch.float64)
    for t in _mc_steps(sched):
        xt = d.q_sample(sched, x0, t, generator=g)
        x_prev = d.posterior_sample(sched, xt, x0, t, generator=g)
        _assert_gaussian(x_prev, math.sqrt(_abar(sched, t - 1)) * 0.7, 1 - _abar(sched, t - 1))


def test_q_pair_marginals_and_transition(sched: d.Schedule) -> None:
    g = _gen(5)
    x0 = torch.full((N_MC,), -0.4, dtype=torch.float64)
    for t in _mc_steps(sched):
        x_prev, xt = d.q_pair(sched, x0, t, generator=g)
        _assert_gaussian(x_prev, math.sqrt(_abar(sched, t - 1)) * -0.4, 1 - _abar(sched, t - 1))
        _assert_gaussian(xt, math.sqrt(_abar(sched, t)) * -0.4, 1 - _abar(sched, t))
        beta = float(sched.betas.double()[t])
        _assert_gaussian(xt - math.sqrt(1 - beta) * x_prev, 0.0, beta)


def test_renoise_is_marginal(sched: d.Schedule) -> None:
    g = _gen(6)
    x0 = torch.full((N_MC,), 0.3, dtype=torch.float64)
    for t in _mc_steps(sched)[-2:]:
        x_prev = d.renoise(sched, x0, t, generator=g)
        _assert_gaussian(x_prev, math.sqrt(_abar(sched, t - 1)) * 0.3, 1 - _abar(sched, t - 1))


def test_ddpm_step_with_true_eps(sched: d.Schedule) -> None:
    g = _gen(7)
    x0 = torch.full((N_MC,), 0.5, dtype=torch.float64)
    for t in _mc_steps(sched)[-3:]:
        eps = torch.randn(N_MC, dtype=torch.float64, generator=g)
        xt = d.q_sample(sched, x0, t, noise=eps)
        mean, var, _ = d.posterior_mean_variance(sched, xt, x0, t)
        zero = torch.zeros_like(xt)
        torch.testing.assert_close(d.ddpm_step(sched, xt, t, eps, noise=zero), mean, rtol=1e-3, atol=2e-3)
        x_prev = d.ddpm_step(sched, xt, t, eps, generator=g)
        _assert_gaussian(x_prev - mean, 0.0, float(var[0]))
        _assert_gaussian(x_prev, math.sqrt(_abar(sched, t - 1)) * 0.5, 1 - _abar(sched, t - 1))


# --------------------------------------------------------------------------- DDIM


def test_ddim_eta0_true_eps_is_exact(sched: d.Schedule) -> None:
    x0 = torch.randn(5, 3, 4, 4, dtype=torch.float64, generator=_gen(8))
    eps = torch.randn(5, 3, 4, 4, dtype=torch.float64, generator=_gen(9))
    n = min(sched.n_steps, 10)
    steps = d.ddim_timesteps(sched.n_steps, n)
    x = d.q_sample(sched, x0, steps[0], noise=eps)
    for t, t_prev in zip(steps, steps[1:] + [0]):
        x = d.ddim_step(sched, x, t, t_prev, eps)
        torch.testing.assert_close(x, d.q_sample(sched, x0, t_prev, noise=eps), rtol=1e-4, atol=1e-4)


def test_ddim_eta1_matches_posterior_for_one_step() -> None:
    s = d.make_schedule("seed", 8)
    x0 = torch.randn(4, 3, dtype=torch.float64, generator=_gen(10))
    eps = torch.randn(4, 3, dtype=torch.float64, generator=_gen(11))
    noise = torch.randn(4, 3, dtype=torch.float64, generator=_gen(12))
    xt = d.q_sample(s, x0, 5, noise=eps)
    torch.testing.assert_close(
        d.ddim_step(s, xt, 5, 4, eps, eta=1.0, noise=noise),
        d.ddpm_step(s, xt, 5, eps, noise=noise),
        rtol=1e-5,
        atol=1e-5,
    )


def test_ddim_clip_bounds_x0() -> None:
    s = d.make_schedule("seed", 4)
    xt = torch.full((2, 3), 5.0)
    out = d.ddim_step(s, xt, 4, 0, torch.zeros(2, 3), clip_x0=1.0)
    torch.testing.assert_close(out, torch.ones(2, 3))


def test_ddim_timesteps() -> None:
    assert d.ddim_timesteps(4, 4) == [4, 3, 2, 1]
    assert d.ddim_timesteps(1000, 1) == [1000]
    assert d.ddim_timesteps(1000, 2) == [1000, 1]
    for T, n in [(1000, 50), (1000, 7), (8, 3), (10, 10)]:
        steps = d.ddim_timesteps(T, n)
        assert len(steps) == n and steps[0] == T and steps[-1] == 1
        assert all(a > b for a, b in zip(steps, steps[1:]))


# --------------------------------------------------------------------------- errors


def test_bad_kind_names_choices() -> None:
    with pytest.raises(UserError, match="seed, vp, linear"):
        d.make_schedule("cosine", 10)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kind="seed", n_steps=0),
        dict(kind="seed", n_steps=2.5),
        dict(kind="seed", n_steps=4, beta_max=1.0),
        dict(kind="linear", n_steps=10, beta_min=0.0),
        dict(kind="vp", n_steps=4, beta_min=-5.0, beta_max=-1.0),
        dict(kind="seed", n_steps=4, beta_min=float("nan")),
    ],
)
def test_bad_schedule_args(kwargs) -> None:
    with pytest.raises(UserError):
        d.make_schedule(**kwargs)


def test_bad_steps_and_args() -> None:
    s = d.make_schedule("seed", 4)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="1..4"):
        d.q_step(s, x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="0..4"):
        d.q_sample(s, x, torch.tensor([5, 1]))
    with pytest.raises(ValueError, match="shape"):
        d.q_sample(s, x, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="integer"):
        d.q_sample(s, x, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="t_prev"):
        d.ddim_step(s, x, 2, 3, x)
    with pytest.raises(ValueError, match="eta"):
        d.ddim_step(s, x, 2, 1, x, eta=-1.0)
    with pytest.raises(ValueError, match="noise"):
        d.q_sample(s, x, 1, noise=torch.zeros(3))
    with pytest.raises(UserError):
        d.ddim_timesteps(4, 5)
