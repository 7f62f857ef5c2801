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
        """The steps `step` will be called with, from T down, as the objective samples: a DDGAN's T (it has no
        other), a diffusion model's T (ancestral DDPM) or `num_inference_steps` of them (DDIM)."""
        grid = self.objective.timesteps(self.config.n_steps, num_inference_steps)
        self.timesteps = torch.tensor(grid, dtype=torch.long, device=device)
        self.num_inference_steps = len(grid)

    @property
    def objective(self):
        return objectives.get(self.config.objective)

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True):
        """x_{t-1} from x_t (`sample`) and the network's output at t: x̂_0 for a DDGAN, ε̂ for a diffusion model.
        The noise is drawn from `generator` on its device, as `samplers.py` draws it."""
        sched = self.schedule.to(sample.device)
        prev, x0 = self.objective.scheduler_step(sched, self.timesteps.tolist(), model_output, int(timestep), sample,
                                                 generator, self.config.step_kind)
        if not return_dict:
            return (prev, x0)
        return CCLDDGSchedulerOutput(prev_sample=prev, pred_original_sample=x0)
