"""A trained model's sampling settings as a diffusers scheduler component (`scheduler/scheduler_config.json` of an
exported model folder): the objective, the noise schedule, its steps and the DDGAN step kind.

It samples the diffusers way too: `set_timesteps(n)` then, for each `t` of `timesteps`, `step(model_output, t,
sample)`. Those are the same steps as the loops in `samplers.py` (which `pipeline.sample` runs): DDGAN's fake
step after each x̂_0, ancestral DDPM when every step is asked for, DDIM (η = 0) over fewer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from cclddg import diffusion, objectives
from cclddg.samplers import randn


@dataclass
class CCLDDGSchedulerOutput(BaseOutput):
    """`prev_sample`: x_{t-1}; `pred_original_sample`: the step's x̂_0 (a DDGAN's output is the last one)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class CCLDDGScheduler(SchedulerMixin, ConfigMixin):
    """DDGAN's T-step sampler (its step: posterior or re-noise from the predicted x_0), or DDPM/DDIM for a
    diffusion model (`objective="diffusion"`), over the run's schedule."""

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, objective: str = "ddgan", schedule: str = "vp", n_steps: int = 4,
                 beta_min: float | None = None, beta_max: float | None = None, step_kind: str = "posterior"):
        self.schedule = diffusion.make_schedule(schedule, n_steps, beta_min, beta_max)  # refuses a bad schedule
        self.set_timesteps()

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None) -> None:
        """The steps `step` will be called with, from T down: a DDGAN's T (it has no other), a diffusion model's T
        (ancestral DDPM) or `num_inference_steps` of them (DDIM)."""
        n_steps = self.config.n_steps
        if self.config.objective == "ddgan" and num_inference_steps not in (None, n_steps):
            raise ValueError(f"a DDGAN samples with its {n_steps} steps, not {num_inference_steps}")
        steps = num_inference_steps or n_steps
        self.ancestral = steps == n_steps
        grid = list(range(n_steps, 0, -1)) if self.ancestral else diffusion.ddim_timesteps(n_steps, steps)
        self.timesteps = torch.tensor(grid, dtype=torch.long, device=device)
        self.num_inference_steps = len(grid)

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True):
        """x_{t-1} from x_t (`sample`) and the network's output at t: x̂_0 for a DDGAN, ε̂ for a diffusion model.
        The noise is drawn from `generator` on its device, as `samplers.py` draws it."""
        t_int = int(timestep)
        sched = self.schedule.to(sample.device)
        t = torch.full((sample.shape[0],), t_int, dtype=torch.long, device=sample.device)
        if self.config.objective == "ddgan":
            x0 = model_output
            prev = x0 if t_int == 1 else objectives.fake_step(sched, self.config.step_kind, sample, x0, t,
                                                               noise=randn(tuple(sample.shape), generator, sample.device))
        elif self.ancestral:
            x0 = diffusion.predict_x0_from_eps(sched, sample, t, model_output).clamp(-1, 1)
            prev = diffusion.ddpm_step(sched, sample, t, model_output, clip_x0=1.0,
                                       noise=randn(tuple(sample.shape), generator, sample.device))
        else:
            grid = self.timesteps.tolist()
            i = grid.index(t_int)
            t_prev = torch.full_like(t, grid[i + 1] if i + 1 < len(grid) else 0)
            x0 = diffusion.predict_x0_from_eps(sched, sample, t, model_output).clamp(-1, 1)
            prev = diffusion.ddim_step(sched, sample, t, t_prev, model_output, eta=0.0, clip_x0=1.0)
        if not return_dict:
            return (prev, x0)
        return CCLDDGSchedulerOutput(prev_sample=prev, pred_original_sample=x0)
