"""Inference: few-step DDGAN sampling, DDPM/DDIM sampling, classifier-free guidance, model loading.

Guidance runs the conditional and the unconditional prediction in ONE batched forward:
`x̂ = x̂(∅) + s·(x̂(c) - x̂(∅))`, where ∅ is the null embedding (zeros) used for dropout in training.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from cclddg import diffusion
from cclddg.config import TrainConfig
from cclddg.diffusion import Schedule
from cclddg.models import UNet
from cclddg.training.checkpoint import load_config, load_model, resolve_checkpoint


def randn(shape: tuple[int, ...], rng: torch.Generator | None, device: torch.device) -> Tensor:
    """Gaussian noise drawn on the generator's device, so a CPU generator gives the same images on any device."""
    gen_device = rng.device if rng is not None else device
    return torch.randn(shape, generator=rng, device=gen_device).to(device)


def guided_forward(model: torch.nn.Module, x: Tensor, t: Tensor, cond: Tensor | None, guidance: float,
                   z: Tensor | None = None, batched: bool = True) -> Tensor:
    """The model's prediction with classifier-free guidance `guidance` (1 = plain conditional)."""
    if cond is None or guidance == 1.0:
        return model(x, t, cond, z)
    null = torch.zeros_like(cond)
    if guidance == 0.0:
        return model(x, t, null, z)
    if batched:
        zz = None if z is None else torch.cat([z, z])
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null]), zz)
        pred_c, pred_u = both.chunk(2)
    else:
        pred_c, pred_u = model(x, t, cond, z), model(x, t, null, z)
    return pred_u + guidance * (pred_c - pred_u)


@torch.no_grad()
def ddgan_sample(generator: torch.nn.Module, schedule: Schedule, shape: tuple[int, ...], cond: Tensor | None = None,
                 guidance: float = 1.0, step_kind: str = "posterior", z_dim: int = 0,
                 rng: torch.Generator | None = None, device: torch.device | str = "cpu",
                 batched_cfg: bool = True) -> Tensor:
    """x_T ~ N(0, I); for t = T..1 predict x̂_0 with a fresh z and step to x_{t-1}; return the last x̂_0."""
    device = torch.device(device)
    sched = schedule.to(device)
    x = randn(shape, rng, device)
    x0 = x
    for step in range(sched.n_steps, 0, -1):
        t = torch.full((shape[0],), step, dtype=torch.long, device=device)
        z = randn((shape[0], z_dim), rng, device) if z_dim else None
        x0 = guided_forward(generator, x, t, cond, guidance, z, batched=batched_cfg)
        if step > 1:
            noise = randn(shape, rng, device)
            if step_kind == "renoise":
                x = diffusion.renoise(sched, x0, t, noise=noise)
            else:
                x = diffusion.posterior_sample(sched, x, x0, t, noise=noise)
    return x0


@torch.no_grad()
def diffusion_sample(model: torch.nn.Module, schedule: Schedule, shape: tuple[int, ...], cond: Tensor | None = None,
                     guidance: float = 1.0, sampler: str = "ddpm", n_sample_steps: int | None = None,
                     rng: torch.Generator | None = None, device: torch.device | str = "cpu",
                     clip_x0: float | None = 1.0, batched_cfg: bool = True) -> Tensor:
    """Ancestral DDPM over every step, or DDIM (eta 0) over `n_sample_steps` evenly spaced steps."""
    device = torch.device(device)
    sched = schedule.to(device)
    x = randn(shape, rng, device)
    if sampler == "ddpm":
        for step in range(sched.n_steps, 0, -1):
            t = torch.full((shape[0],), step, dtype=torch.long, device=device)
            eps = guided_forward(model, x, t, cond, guidance, batched=batched_cfg)
            noise = randn(shape, rng, device)
            x = diffusion.ddpm_step(sched, x, t, eps, noise=noise, clip_x0=clip_x0)
        return x
    if sampler != "ddim":
        raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
    steps = diffusion.ddim_timesteps(sched.n_steps, n_sample_steps or 50)
    for i, step in enumerate(steps):
        prev = steps[i + 1] if i + 1 < len(steps) else 0
        t = torch.full((shape[0],), step, dtype=torch.long, device=device)
        t_prev = torch.full((shape[0],), prev, dtype=torch.long, device=device)
        eps = guided_forward(model, x, t, cond, guidance, batched=batched_cfg)
        x = diffusion.ddim_step(sched, x, t, t_prev, eps, eta=0.0, clip_x0=clip_x0)
    return x


def sample(model: torch.nn.Module, cfg: TrainConfig, n: int, cond: Tensor | None = None, guidance: float = 1.0,
           sampler: str | None = None, n_sample_steps: int | None = None, rng: torch.Generator | None = None,
           device: torch.device | str = "cpu") -> Tensor:
    """Images in [-1, 1] from a trained generator, using the run's own schedule and objective."""
    schedule = diffusion.make_schedule(cfg.schedule, cfg.n_steps, cfg.beta_min, cfg.beta_max)
    shape = (n, model.config.image_channels, cfg.img_size, cfg.img_size)
    if cfg.objective == "ddgan":
        x = ddgan_sample(model, schedule, shape, cond, guidance, cfg.step_kind, cfg.z_dim, rng, device)
    else:
        x = diffusion_sample(model, schedule, shape, cond, guidance, sampler or "ddim", n_sample_steps, rng, device)
    return x.clamp(-1, 1)


def load_generator(path: str | Path, ema: bool = True, device: torch.device | str = "cpu"):
    """(generator, config) from a run folder (its latest checkpoint) or one checkpoint folder."""
    ckpt = resolve_checkpoint(Path(path))
    cfg = load_config(ckpt)
    name = "generator_ema" if ema and (ckpt / "generator_ema").exists() else "generator"
    model = load_model(UNet, ckpt / name).to(device).eval()
    return model, cfg
