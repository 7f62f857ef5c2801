"""DDGAN (Xiao et al. 2022): a generator that predicts x̂_0 from (x_t, t, c, z) and takes each of T large reverse steps
through the posterior, trained against a discriminator on (x_{t-1}, x_t) pairs. The losses are docs/DESIGN.md's
("The maths"), with D returning a logit:

    L_D = softplus(-D(x_{t-1}, x_t)) + softplus(D(x̂_{t-1}, x_t)) + γ/2·‖∇_{x_{t-1}} D(x_{t-1}, x_t)‖²
    L_G = softplus(-D(x̂_{t-1}, x_t)) + λ_rec·‖x̂_0 - x_0‖²

R1 is lazy: computed every k steps and scaled by k.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cclddg import diffusion
from cclddg.config import TrainConfig
from cclddg.diffusion import Schedule, randn
from cclddg.errors import UserError
from cclddg.models import Discriminator, UNet
from cclddg.models.blocks import twice_differentiable_attention
from cclddg.models.from_config import discriminator_from_config, generator_from_config
from cclddg.objectives.base import Micro, Objective, StepLogs, TrainingRun, sample_steps


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


class DDGAN(Objective):
    """The generator and the discriminator, T reverse steps (`cfg.n_steps`), the step kind of `cfg.step_kind`."""

    name = "ddgan"
    samplers = ("ddgan",)
    takes_z = True
    predicts_x0 = True
    shown = ("loss_d", "loss_g", "d_real", "d_fake")

    def build(self, cfg: TrainConfig, cond_dim: int, cond_scale: float) -> tuple[UNet, Discriminator]:
        gen = generator_from_config(cfg, cond_dim if cfg.use_cloob_unet else 0, cond_scale, self.z_dim(cfg))
        disc = discriminator_from_config(cfg, cond_dim if cfg.use_cloob_disc else 0, cond_scale)
        return gen, disc

    def train_step(self, run: TrainingRun, micro: Micro) -> dict[str, float]:
        """D's update on every micro-batch, then G's (through the updated D).

        With one micro-batch G's forward pass is made once and serves both updates; with several it is made
        without gradients for D's update and again, on the same inputs, for G's (memory stays that of one)."""
        cfg, k = run.cfg, len(micro)
        weight = r1_weight(run.step, cfg.r1_gamma, cfg.lazy_reg)
        logs = StepLogs()
        kept = []
        run.disc.requires_grad_(True)
        for i, (x0, cond) in enumerate(micro):
            cond_g, cond_d = run.split_cond(cond)
            with run.sync_on_last(run.disc, i, k), run.autocast():
                t = sample_steps(x0.shape[0], cfg.n_steps, x0.device)
                x_prev, x_t = diffusion.q_pair(run.schedule, x0, t)
                z = torch.randn(x0.shape[0], cfg.z_dim, device=x0.device) if cfg.z_dim else None
                with torch.set_grad_enabled(k == 1):
                    x0_pred = run.gen(x_t, t, cond_g, z)
                    fake_prev = fake_step(run.schedule, cfg.step_kind, x_t, x0_pred, t)
                loss_d, step_logs = discriminator_loss(run.disc, x_prev, fake_prev, x_t, t, cond_d, weight,
                                                       run.opt_d.scaler.get_scale())
            run.opt_d.backward(loss_d, k)
            logs.add(step_logs)
            kept.append((x0, x_t, t, z, cond_g, cond_d, (x0_pred, fake_prev) if k == 1 else None))
        # fp16: an R1 that overflows the loss scale is the scaler's to skip; D's outputs must still be finite.
        checked = ["d_real", "d_fake"] + ([] if run.opt_d.scaler.is_enabled() else ["loss_d"])
        norm_d = run.update(run.opt_d, run.disc, logs.finite(checked), "D")

        run.disc.requires_grad_(False)  # G's loss needs gradients through D, not for D
        for i, (x0, x_t, t, z, cond_g, cond_d, made) in enumerate(kept):
            with run.sync_on_last(run.gen, i, k), run.autocast():
                if made is None:
                    x0_pred = run.gen(x_t, t, cond_g, z)
                    made = x0_pred, fake_step(run.schedule, cfg.step_kind, x_t, x0_pred, t)
                x0_pred, fake_prev = made
                loss_g, step_logs = generator_loss(run.disc_frozen, fake_prev, x_t, t, cond_d, x0_pred, x0,
                                                   cfg.recon_loss_scale)
            run.opt_g.backward(loss_g, k)
            logs.add(step_logs)
        norm_g = run.update(run.opt_g, run.gen, logs.finite(["loss_g"]), "G")
        return {**logs.means(), "grad_norm_d": norm_d, "grad_norm_g": norm_g}

    def calls(self, sampler: str, n_steps: int, steps: int | None) -> int:
        if steps not in (None, n_steps):
            raise UserError(f"this DDGAN samples in the {n_steps} steps it was trained with, not {steps}; drop the "
                            "step count")
        return n_steps

    def sampler_options(self, step_kind: str, z_dim: int, z_rng: torch.Generator | None) -> dict[str, Any]:
        return {"step_kind": step_kind, "z_dim": z_dim, "z_rng": z_rng}

    def timesteps(self, n_steps: int, num_inference_steps: int | None = None) -> list[int]:
        self.calls("ddgan", n_steps, num_inference_steps)
        return list(range(n_steps, 0, -1))

    def scheduler_step(self, schedule: Schedule, timesteps: list[int], model_output: Tensor, t: int, sample: Tensor,
                       generator: torch.Generator | None, step_kind: str) -> tuple[Tensor, Tensor]:
        if t == 1:
            return model_output, model_output
        steps = torch.full((sample.shape[0],), t, dtype=torch.long, device=sample.device)
        noise = randn(tuple(sample.shape), generator, sample.device)
        return fake_step(schedule, step_kind, sample, model_output, steps, noise=noise), model_output


OBJECTIVE = DDGAN()
