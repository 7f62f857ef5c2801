"""The sampling loops (samplers.py), guidance as a wrapper, and the scheduler component stepping the diffusers way
to the same images as `pipeline.sample`."""

from __future__ import annotations

import pytest
import torch

from cclddg import objectives
from cclddg.diffusion import make_schedule, randn
from cclddg.models import UNet
from cclddg.pipeline import SamplingConfig, sample
from cclddg.samplers import SAMPLERS, Guided
from cclddg.scheduler import CCLDDGScheduler


def tiny_unet(z_dim: int) -> UNet:
    torch.manual_seed(0)
    return UNet(image_channels=3, n_channels=8, ch_mults=(1, 2), is_attn=(False, False), n_blocks=1, z_dim=z_dim,
                n_z_channels=8, cond_dim=6, n_cond_channels=8, sample_size=8).eval()


def test_every_sampler_an_objective_names_is_registered_and_every_registered_one_is_named():
    named = [s for name in objectives.names() for s in objectives.get(name).samplers]
    assert sorted(named) == sorted(SAMPLERS)


def test_guidance_is_the_formula_and_one_batched_call():
    """Guided at scale s returns u + s (c - u) from one forward of twice the rows; scale 1 calls the model once
    with the condition, scale 0 with the null condition."""
    calls = []

    def model(x, t, cond, z):
        calls.append(len(x))
        return x * 0 + cond.sum(dim=1).view(-1, 1, 1, 1)  # the prediction is the condition's sum

    x, t, cond = torch.zeros(2, 3, 4, 4), torch.ones(2, dtype=torch.long), torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = Guided(model, cond, 3.0)(x, t)
    assert calls == [4] and torch.allclose(out[:, 0, 0, 0], 3.0 * torch.tensor([3.0, 7.0]))
    uncond = torch.tensor([[1.0, 1.0]])
    out = Guided(model, cond, 2.0, uncond=uncond)(x, t)  # negative prompt: u is uncond's prediction, 2
    assert torch.allclose(out[:, 0, 0, 0], 2 + 2.0 * (torch.tensor([3.0, 7.0]) - 2))
    calls.clear()
    assert torch.allclose(Guided(model, cond, 1.0)(x, t)[:, 0, 0, 0], torch.tensor([3.0, 7.0])) and calls == [2]
    assert torch.allclose(Guided(model, cond, 0.0)(x, t), torch.zeros(2, 3, 4, 4))
    separate = Guided(model, cond, 3.0, batched=False)(x, t)
    assert torch.allclose(separate, Guided(model, cond, 3.0)(x, t))


@pytest.mark.parametrize("objective, sampler, steps", [("ddgan", None, None), ("diffusion", "ddpm", None),
                                                        ("diffusion", "ddim", 5)])
def test_the_scheduler_steps_to_the_pipelines_images(objective, sampler, steps):
    """A diffusers-style loop (set_timesteps, then step for each timestep) gives `pipeline.sample`'s images bit for
    bit, from the same generator."""
    n_steps, schedule = (4, "vp") if objective == "ddgan" else (20, "linear")
    z_dim = 4 if objective == "ddgan" else 0
    model = tiny_unet(z_dim)
    config = SamplingConfig(objective=objective, schedule=schedule, n_steps=n_steps, z_dim=z_dim, latent_size=8,
                            cond="labels")
    cond = torch.randn(2, 6)
    expected = sample(model, config, 2, cond=cond, guidance=2.0, sampler=sampler, steps=steps,
                      rng=torch.Generator().manual_seed(7))

    scheduler = CCLDDGScheduler(objective=objective, schedule=schedule, n_steps=n_steps)
    scheduler.set_timesteps(steps if sampler == "ddim" else None)
    assert len(scheduler.timesteps) == (steps or n_steps) and int(scheduler.timesteps[0]) == n_steps
    rng = torch.Generator().manual_seed(7)
    x = randn((2, 3, 8, 8), rng, "cpu")
    denoiser = Guided(model, cond, 2.0)
    for t in scheduler.timesteps:
        z = randn((2, z_dim), rng, "cpu") if z_dim else None
        out = scheduler.step(denoiser(x, torch.full((2,), int(t)), z), t, x, generator=rng)
        x = out.prev_sample
    images = (out.pred_original_sample if objective == "ddgan" else x).clamp(-1, 1)
    assert torch.equal(images, expected)


def test_a_ddgan_has_only_its_own_steps():
    with pytest.raises(ValueError, match="4 steps"):
        CCLDDGScheduler(n_steps=4).set_timesteps(2)
    with pytest.raises(ValueError, match="4 steps"):
        SAMPLERS["ddgan"](lambda x, t, z=None: x, torch.zeros(1, 3, 8, 8), make_schedule("vp", 4), steps=2)


def test_the_callback_sees_every_step():
    seen = []
    schedule = make_schedule("linear", 30)
    SAMPLERS["ddim"](lambda x, t, z=None: torch.zeros_like(x), torch.randn(1, 3, 4, 4), schedule, steps=6,
                     callback=seen.append)
    assert [s["i"] for s in seen] == list(range(6)) and seen[0]["t"] == 30 and seen[-1]["t"] == 1
