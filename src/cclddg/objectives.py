"""Training losses, exactly as in docs/DESIGN.md ("The maths").

DDGAN, with D returning a logit:
    L_D = softplus(-D(x_{t-1}, x_t)) + softplus(D(x̂_{t-1}, x_t)) + γ/2·‖∇_{x_{t-1}} D(x_{t-1}, x_t)‖²
    L_G = softplus(-D(x̂_{t-1}, x_t)) + λ_rec·‖x̂_0 - x_0‖²
R1 is lazy: computed every k steps and scaled by k. Diffusion: epsilon prediction, ‖ε̂ - ε‖².
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from cclddg import diffusion
from cclddg.diffusion import Schedule
from cclddg.models.blocks import twice_differentiable_attention


def sample_steps(batch: int, n_steps: int, device: torch.device) -> Tensor:
    """t ~ U{1..T}."""
    return torch.randint(1, n_steps + 1, (batch,), device=device)


def fake_step(schedule: Schedule, step_kind: str, x_t: Tensor, x0_pred: Tensor, t: Tensor,
              noise: Tensor | None = None) -> Tensor:
    """The generator's x̂_{t-1}, in training and at sampling alike: from the posterior q(x_{t-1} | x_t, x̂_0), or
    re-noised from x̂_0 (the seed's `step_kind`)."""
    if step_kind == "renoise":
        return diffusion.renoise(schedule, x0_pred, t, noise=noise)
    return diffusion.posterior_sample(schedule, x_t, x0_pred, t, noise=noise)


def r1_weight(step: int, gamma: float, lazy_reg: int) -> float:
    """The weight of R1 at this step: γ/2·k on every k-th step (lazy regularisation, as StyleGAN2), else 0."""
    return gamma / 2 * lazy_reg if gamma > 0 and step % lazy_reg == 0 else 0.0


def discriminator_loss(disc: torch.nn.Module, x_prev: Tensor, fake_prev: Tensor, x_t: Tensor, t: Tensor,
                       cond: Tensor | None, r1_weight: float, grad_scale: float = 1.0) -> tuple[Tensor, dict[str, float]]:
    """L_D on a real and a (detached) fake pair; R1 on the real x_{t-1} when r1_weight > 0.

    `r1_weight` is already γ/2·k for a lazy step (k = the lazy interval), 0 otherwise. `grad_scale` is the fp16
    loss scale: R1's input gradient is taken of the scaled output (so small gradients do not underflow in fp16)
    and unscaled before it is squared, so the penalty is the same at any scale.
    """
    x_prev = x_prev.detach().requires_grad_(r1_weight > 0)
    with twice_differentiable_attention() if r1_weight > 0 else contextlib.nullcontext():
        d_real = disc(x_prev, x_t, t, cond).float()
    d_fake = disc(fake_prev.detach(), x_t, t, cond).float()
    loss = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
    logs = {"d_real": d_real.detach().mean().item(), "d_fake": d_fake.detach().mean().item()}
    if r1_weight > 0:
        (grad,) = torch.autograd.grad(d_real.sum() * grad_scale, x_prev, create_graph=True)
        r1 = (grad.float() / grad_scale).pow(2).flatten(1).sum(1).mean()
        loss = loss + r1_weight * r1
        logs["r1"] = r1.detach().item()
    logs["loss_d"] = loss.detach().item()
    return loss, logs


def generator_loss(disc: torch.nn.Module, fake_prev: Tensor, x_t: Tensor, t: Tensor, cond: Tensor | None,
                   x0_pred: Tensor, x0: Tensor, recon_scale: float) -> tuple[Tensor, dict[str, float]]:
    """L_G: the non-saturating GAN loss plus the seed's optional reconstruction term."""
    adv = F.softplus(-disc(fake_prev, x_t, t, cond).float()).mean()
    loss = adv
    logs = {"loss_g_adv": adv.detach().item()}
    if recon_scale > 0:
        recon = F.mse_loss(x0_pred.float(), x0.float())
        loss = loss + recon_scale * recon
        logs["recon"] = recon.detach().item()
    logs["loss_g"] = loss.detach().item()
    return loss, logs


def diffusion_loss(model: torch.nn.Module, schedule: Schedule, x0: Tensor,
                   cond: Tensor | None) -> tuple[Tensor, dict[str, float]]:
    """‖ε̂(x_t, t, c) - ε‖² with t ~ U{1..T} and x_t ~ q(x_t | x_0)."""
    t = sample_steps(x0.shape[0], schedule.n_steps, x0.device)
    noise = torch.randn_like(x0)
    x_t = diffusion.q_sample(schedule, x0, t, noise=noise)
    loss = F.mse_loss(model(x_t, t, cond).float(), noise)
    return loss, {"loss": loss.detach().item()}
