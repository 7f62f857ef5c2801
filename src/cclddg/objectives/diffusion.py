"""The diffusion baseline (DDPM, Ho et al. 2020): ε-prediction over T small steps, ‖ε̂(x_t, t, c) - ε‖² with
t ~ U{1..T}; sampled by ancestral DDPM over every step or DDIM (η = 0) over fewer. The maths: docs/DESIGN.md,
"The DDPM baseline"."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cclddg import diffusion
from cclddg.config import TrainConfig
from cclddg.diffusion import Schedule, randn
from cclddg.errors import UserError
from cclddg.models import UNet
from cclddg.models.from_config import generator_from_config
from cclddg.objectives.base import Micro, Objective, StepLogs, TrainingRun, sample_steps

DEFAULT_DDIM_STEPS = 50  # a diffusion model's DDIM steps unless asked (all of them, when a schedule has fewer)


def diffusion_loss(model: torch.nn.Module, schedule: Schedule, x0: Tensor,
                   cond: Tensor | None) -> tuple[Tensor, dict[str, float]]:
    """‖ε̂(x_t, t, c) - ε‖² with t ~ U{1..T} and x_t ~ q(x_t | x_0)."""
    t = sample_steps(x0.shape[0], schedule.n_steps, x0.device)
    noise = torch.randn_like(x0)
    x_t = diffusion.q_sample(schedule, x0, t, noise=noise)
    loss = F.mse_loss(model(x_t, t, cond).float(), noise)
    return loss, {"loss": loss.detach().item()}


class Diffusion(Objective):
    """One ε network, no discriminator; DDIM (the default, DEFAULT_DDIM_STEPS) or ancestral DDPM."""

    name = "diffusion"
    samplers = ("ddim", "ddpm")
    shown = ("loss",)

    def check(self, cfg: TrainConfig) -> None:
        if cfg.n_steps < 2:
            raise UserError("--objective diffusion needs --n_steps >= 2 (1000 is usual)")

    def build(self, cfg: TrainConfig, cond_dim: int, cond_scale: float) -> tuple[UNet, None]:
        return generator_from_config(cfg, cond_dim if cfg.use_cloob_unet else 0, cond_scale, self.z_dim(cfg)), None

    def train_step(self, run: TrainingRun, micro: Micro) -> dict[str, float]:
        k, logs = len(micro), StepLogs()
        for i, (x0, cond) in enumerate(micro):
            with run.sync_on_last(run.gen, i, k), run.autocast():
                loss, step_logs = diffusion_loss(run.gen, run.schedule, x0, run.split_cond(cond)[0])
            run.opt_g.backward(loss, k)
            logs.add(step_logs)
        norm = run.update(run.opt_g, run.gen, logs.finite(["loss"]), "the model")
        return {**logs.means(), "grad_norm_g": norm}

    def calls(self, sampler: str, n_steps: int, steps: int | None) -> int:
        if sampler == "ddpm":
            if steps not in (None, n_steps):
                raise UserError(f"DDPM samples with every one of the model's {n_steps} steps, not {steps}; use "
                                "--sampler ddim for fewer")
            return n_steps
        return steps or min(DEFAULT_DDIM_STEPS, n_steps)

    def timesteps(self, n_steps: int, num_inference_steps: int | None = None) -> list[int]:
        """Every step (ancestral DDPM) when asked for all of them or none, else DDIM's evenly spaced ones."""
        steps = num_inference_steps or n_steps
        return list(range(n_steps, 0, -1)) if steps == n_steps else diffusion.ddim_timesteps(n_steps, steps)

    def scheduler_step(self, schedule: Schedule, timesteps: list[int], model_output: Tensor, t: int, sample: Tensor,
                       generator: torch.Generator | None, step_kind: str) -> tuple[Tensor, Tensor]:
        steps = torch.full((sample.shape[0],), t, dtype=torch.long, device=sample.device)
        x0 = diffusion.predict_x0_from_eps(schedule, sample, steps, model_output).clamp(-1, 1)
        if len(timesteps) == schedule.n_steps:  # ancestral
            noise = randn(tuple(sample.shape), generator, sample.device)
            return diffusion.ddpm_step(schedule, sample, steps, model_output, clip_x0=1.0, noise=noise), x0
        i = timesteps.index(t)
        t_prev = torch.full_like(steps, timesteps[i + 1] if i + 1 < len(timesteps) else 0)
        return diffusion.ddim_step(schedule, sample, steps, t_prev, model_output, eta=0.0, clip_x0=1.0), x0


OBJECTIVE = Diffusion()
