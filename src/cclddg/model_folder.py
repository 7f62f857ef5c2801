"""A trained model as one folder that samples anywhere, and `CCLDDGPipeline`, its diffusers-style pipeline.

`cclddg export RUN OUT` (`export_run`) writes diffusers' folder layout, with no pickles and no paths to elsewhere:

    OUT/model_index.json            the pipeline class, its components, and the sampling defaults (conditioning
                                    kind, image size, text prior, default guidance)
    OUT/unet/                       the generator (EMA weights by default): config.json + safetensors
    OUT/scheduler/                  the objective, noise schedule, steps and DDGAN step kind (scheduler_config.json)
    OUT/vae/                        the autoencoder (diffusers AutoencoderKL/AutoencoderTiny); its config's
                                    `scaling_factor` is the run's latent scale (absent for pixel-space models)
    OUT/embedder/                   the embedder (encoders/component.py; absent for label or unconditional models)
    OUT/prior/                      the learned text prior (priors/flow.py), when the run has one
    OUT/embedding_stats.safetensors the text priors' statistics of the training data (when the run has them)

`CCLDDGPipeline` is a `diffusers.DiffusionPipeline`: `from_pretrained(folder, torch_dtype=...)`, `.to(device)`,
`save_pretrained` (and `push_to_hub`) come with it. It samples with `pipeline.sample_batches`, the code a run
samples with, so the same seed gives the run's images bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from PIL import Image

from cclddg import conditioning, objectives
from cclddg.atomic import write_text_atomic
from cclddg.conditioning.base import PIPELINE_NAMES, Request
from cclddg.conditioning.prompts import PromptConditioner
from cclddg.data.images import tensor_to_image
from cclddg.data.shapes import parse_attrs
from cclddg.encoders import load_embedder
from cclddg.encoders.component import EmbedderModel
from cclddg.errors import UserError, first_line
from cclddg.folder_check import EXPORT_AGAIN, check_model_folder
from cclddg.latents import load_latent_space
from cclddg.latents.vae import DiffusersVAE
from cclddg.models import UNet
from cclddg.options import GUIDANCE, number_problem
from cclddg.pipeline import (
    INDEX_FIELDS,
    SCHEDULER_FIELDS,
    SamplingConfig,
    folder_sampling_config,
    load_generator,
    prompt_image,
    sample_batches,
)
from cclddg.priors import FlowPrior, PriorSettings, load_flow_prior, make_text_prior
from cclddg.priors.stats import load_stats, stats_path
from cclddg.scheduler import CCLDDGScheduler

OUTPUT_TYPES = ("pil", "pt", "np")


@dataclass
class CCLDDGPipelineOutput(BaseOutput):
    """`images`: a list of PIL images, or an array (B, H, W, 3) ("np") / a tensor (B, 3, H, W) ("pt") in [0, 1]."""

    images: list[Image.Image] | np.ndarray | torch.Tensor


class CCLDDGPipeline(DiffusionPipeline):
    """Text/image-prompted (or label-conditioned, or unconditional) few-step generation from a cclddg model.

        pipe = CCLDDGPipeline.from_pretrained("models/demo")
        images = pipe(prompt="a red circle in the top left", num_images_per_prompt=4, guidance_scale=2.0,
                      generator=torch.Generator().manual_seed(0)).images
    """

    model_cpu_offload_seq = "embedder->prior->unet->vae"
    _optional_components = ["vae", "embedder", "prior"]

    def __init__(self, unet: UNet, scheduler: CCLDDGScheduler, vae: Any = None, embedder: EmbedderModel | None = None,
                 prior: FlowPrior | None = None, cond: str = "embedding", img_size: int = 32, text_prior: str = "none",
                 prior_k: int = 8, prior_guidance: float = 1.0, prior_guidance_start: float = 0.0,
                 guidance_scale: float = 1.0, holdout: str = ""):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae, embedder=embedder, prior=prior)
        self.register_to_config(cond=cond, img_size=img_size, text_prior=text_prior, prior_k=prior_k,
                                prior_guidance=prior_guidance, prior_guidance_start=prior_guidance_start,
                                guidance_scale=guidance_scale, holdout=holdout)
        self.stats = None  # the text priors' statistics (embedding_stats.safetensors), when the model has them

    # ---- from a run, to a folder, from a folder ----------------------------------------------------------
    @classmethod
    def from_run(cls, run: str | Path, ema: bool = True, guidance_scale: float = 1.0) -> CCLDDGPipeline:
        """The pipeline of a training run (its latest checkpoint): what `cclddg export` writes."""
        unet, cfg = load_generator(run, ema=ema)
        if isinstance(cfg, SamplingConfig):
            raise UserError(f"{run} is already an exported model folder")
        scheduler = CCLDDGScheduler(**{k: getattr(cfg, k) for k in SCHEDULER_FIELDS})
        vae = None
        if cfg.autoencoder != "pixels":
            vae = load_latent_space(cfg.autoencoder, scale=cfg.latent_scale).vae
            vae.register_to_config(scaling_factor=float(cfg.latent_scale))
        uses_encoder = conditioning.get(cfg.cond).uses_encoder
        embedder = EmbedderModel.wrap(load_embedder(cfg.encoder)) if uses_encoder else None
        prior = load_flow_prior(run) if uses_encoder else None
        pipe = cls(unet=unet, scheduler=scheduler, vae=vae, embedder=embedder, prior=prior,
                   guidance_scale=guidance_scale, **{k: getattr(cfg, k) for k in INDEX_FIELDS})
        pipe.stats = load_stats(Path(run))
        return pipe

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> CCLDDGPipeline:
        """A model folder (`cclddg export`, or `save_pretrained`); diffusers' options (torch_dtype ...) apply."""
        folder = Path(pretrained_model_name_or_path)
        if not (folder / "model_index.json").is_file():
            raise UserError(f"{folder} is not a cclddg model folder (no model_index.json); make one with "
                            "`cclddg export RUN OUT`")
        check_model_folder(folder)  # every file, before diffusers imports or loads anything (folder_check.py)
        try:
            pipe = super().from_pretrained(str(folder), use_safetensors=True, **kwargs)
        except UserError:
            raise
        except Exception as exc:  # a config whose values the model cannot be built from, ...
            first = first_line(exc)
            raise UserError(f"could not load the model folder {folder} ({type(exc).__name__}: {first[:200]}); "
                            f"{EXPORT_AGAIN}") from exc
        pipe.stats = load_stats(folder)
        return pipe

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """diffusers' save, then the text priors' statistics; no config keeps the path a component came from."""
        super().save_pretrained(str(save_directory), **kwargs)
        if self.stats is not None:
            self.stats.save(stats_path(Path(save_directory)))
        for path in Path(save_directory).rglob("*.json"):
            config = json.loads(path.read_text())
            if isinstance(config, dict) and config.pop("_name_or_path", None) is not None:
                write_text_atomic(path, json.dumps(config, indent=2, sort_keys=True) + "\n")

    # ---- what sampling needs -------------------------------------------------------------------------------
    @property
    def sampling_config(self) -> SamplingConfig:
        vae = None if self.vae is None else dict(self.vae.config)
        return folder_sampling_config(dict(self.config), dict(self.scheduler.config), dict(self.unet.config), vae)

    @property
    def latent_space(self) -> DiffusersVAE | None:
        """The autoencoder as a latent space with its scale (None: a pixel-space model)."""
        if self.vae is None:
            return None
        return DiffusersVAE(self.vae).with_scale(float(self.vae.config.scaling_factor))

    def conditioner(self, **prior_overrides) -> PromptConditioner:
        """Prompts -> conditions through the model's text prior (`text_prior=`, `prior_k=`, `prior_guidance=`,
        `prior_guidance_start=` override the model's; None: not given)."""
        if self.embedder is None:  # the kind's own words: a prompt is not for it, and what to give instead
            conditioning.get(self.config.cond).check_request(Request(prompts=("",)), PIPELINE_NAMES)
        prior = make_text_prior(PriorSettings.of(self.config, **prior_overrides), self.stats, self.prior,
                                self.embedder.embedder.dim, "this model")
        return PromptConditioner(self.embedder.embedder, prior)

    # ---- sampling ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str] | None = None, negative_prompt: str | None = None,
                 image: Any = None, image_weight: float = 0.5, attrs: str | dict | Sequence | None = None,
                 guidance_scale: float | None = None, num_images_per_prompt: int = 1,
                 num_inference_steps: int | None = None, sampler: str | None = None, generator: torch.Generator | None = None,
                 output_type: str = "pil", batch_size: int = 64, text_prior: str | None = None,
                 prior_guidance: float | None = None, prior_guidance_start: float | None = None,
                 return_dict: bool = True) -> CCLDDGPipelineOutput | tuple:
        """Images for prompts (text, `image`s to vary, or both mixed by `image_weight`), for label `attrs`
        (shapes models: "color=red,shape=circle" or a dict, one per row), or unconditional ones.

        `num_images_per_prompt` per prompt/image/request, prompt-major. `num_inference_steps`: a diffusion
        model's DDIM steps; a DDGAN samples in the T steps it was trained with. `sampler`: a diffusion model's
        (ddim, the default, or ddpm). `generator` seeds the noise and
        the retrieval prior (a CPU generator gives the same images on any device)."""
        if output_type not in OUTPUT_TYPES:
            raise UserError(f"output_type {output_type!r} is not valid; choose one of {', '.join(OUTPUT_TYPES)}")
        if not (isinstance(num_images_per_prompt, int) and num_images_per_prompt >= 1):
            raise UserError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
        config = self.sampling_config
        guidance = self.config.guidance_scale if guidance_scale is None else guidance_scale
        problem = number_problem(guidance, GUIDANCE)
        if problem:
            raise UserError(f"guidance_scale {problem}")
        guidance = float(guidance)
        steps = self._steps(config, sampler, num_inference_steps)
        rng = generator if generator is not None else torch.Generator().manual_seed(int(torch.seed() % 2**63))
        seed = rng.initial_seed()
        n = num_images_per_prompt
        prior = dict(text_prior=text_prior, prior_guidance=prior_guidance, prior_guidance_start=prior_guidance_start)
        cond, negative = self._conditions(prompt, negative_prompt, image, image_weight, attrs, n, seed, prior)
        count = n if cond is None else len(cond)
        device = self._execution_device
        batches = sample_batches(self.unet, config, count, cond=cond, batch_size=batch_size, rng=rng, device=device,
                                 guidance=guidance if cond is not None else 1.0, sampler=sampler, steps=steps,
                                 uncond=None if negative is None else negative.to(device), space=self.latent_space)
        images = torch.cat(list(batches))  # (B, 3, H, W) in [-1, 1], on the CPU
        out: Any = images
        if output_type == "pil":
            out = [tensor_to_image(x) for x in images]
        elif output_type == "pt":
            out = (images + 1) / 2
        else:
            out = ((images + 1) / 2).permute(0, 2, 3, 1).numpy()
        return CCLDDGPipelineOutput(images=out) if return_dict else (out,)

    def _steps(self, config: SamplingConfig, sampler: str | None, num_inference_steps: int | None) -> int | None:
        objectives.get(config.objective).sampler(config.n_steps, sampler, num_inference_steps)  # what it can't: a line
        if num_inference_steps is None:
            return None
        if not (isinstance(num_inference_steps, int) and 1 <= num_inference_steps <= config.n_steps):
            raise UserError(f"num_inference_steps must be an integer in 1..{config.n_steps}, got {num_inference_steps!r}")
        return num_inference_steps

    def _conditions(self, prompt, negative_prompt, image, image_weight, attrs, n: int, seed: int,
                    prior: dict[str, Any]) -> tuple[Any, torch.Tensor | None]:
        """(conditions, one per image, made batch by batch; the negative prompt's condition) of this call, as the
        model's conditioning kind makes them."""
        kind = conditioning.get(self.config.cond)
        prompts = (prompt,) if isinstance(prompt, str) else tuple(prompt or ())
        images = () if image is None else (tuple(image) if isinstance(image, (list, tuple)) else (image,))
        if attrs is None:  # a label model asked for nothing names no attribute
            requests = ({},) if "attrs" in kind.asks else ()
        else:
            requests = tuple(parse_attrs(a) if isinstance(a, str) else dict(a)
                             for a in ([attrs] if isinstance(attrs, (str, dict)) else list(attrs)))
        request = Request(prompts=prompts, images=images, image_weight=image_weight,
                          negative_prompt=negative_prompt, attrs=requests)
        kind.check_request(request, PIPELINE_NAMES)
        request = dataclasses.replace(request, images=tuple(prompt_image(i) for i in images))
        return kind.conditions(request, n, seed, lambda: self.conditioner(**prior))


def export_run(run: str | Path, out: str | Path, ema: bool = True, guidance_scale: float = 1.0) -> Path:
    """Write a run's model folder (module docstring) to `out`, which must not exist or be empty; written in a
    temporary folder beside it and renamed when complete."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder; choose a new folder for the model")
    pipe = CCLDDGPipeline.from_run(run, ema=ema, guidance_scale=guidance_scale)
    out.parent.mkdir(parents=True, exist_ok=True)
    for leftover in out.parent.glob(f".{out.name}.tmp-*"):  # an export of OUT that was killed: never complete
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir()  # made with the user's usual mode (mkdtemp's would be private, 0700), and renamed to OUT
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
