"""A trained model's sampling settings as a diffusers scheduler component (`scheduler/scheduler_config.json` of an
exported model folder): the objective, the noise schedule, its steps and the DDGAN step kind.

It is a thin, saveable description: the sampling itself is `pipeline.sample`, the same code a run samples with,
so an exported model gives the run's images bit for bit.
"""

from __future__ import annotations

from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config

from cclddg import diffusion


class CCLDDGScheduler(SchedulerMixin, ConfigMixin):
    """DDGAN's T-step sampler (its step: posterior or re-noise from the predicted x_0), or DDPM/DDIM for a
    diffusion model (`objective="diffusion"`), over the run's schedule."""

    config_name = "scheduler_config.json"

    @register_to_config
    def __init__(self, objective: str = "ddgan", schedule: str = "vp", n_steps: int = 4,
                 beta_min: float | None = None, beta_max: float | None = None, step_kind: str = "posterior"):
        diffusion.make_schedule(schedule, n_steps, beta_min, beta_max)  # refuse a schedule that cannot be made

    def make_schedule(self) -> diffusion.Schedule:
        c = self.config
        return diffusion.make_schedule(c.schedule, c.n_steps, c.beta_min, c.beta_max)
