"""Inference: `sample` and `sample_batches` (the function every way of sampling goes through: CCLDDGPipeline,
the CLI, eval, the demo, the trainer's grids), the small SamplingConfig they read, and model loading.

The loops themselves and classifier-free guidance are `samplers.py`'s.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from cclddg import conditioning, diffusion, objectives
from cclddg.conditioning.base import CLI_NAMES
from cclddg.conditioning.prompts import PromptConditioner, PromptConditions
from cclddg.config import TrainConfig
from cclddg.data.images import image_to_tensor, tensor_to_image
from cclddg.diffusion import randn
from cclddg.encoders import load_embedder
from cclddg.errors import UserError
from cclddg.folder_check import check_model_folder, present, read_json
from cclddg.latents import LatentSpace, load_latent_space
from cclddg.models import UNet
from cclddg.priors import PriorSettings, TextPrior, text_prior_of
from cclddg.run_folder import load_config, resolve_checkpoint
from cclddg.samplers import SAMPLERS, Callback, Guided
from cclddg.storage import load_model

# SamplingConfig's fields a model folder keeps in its scheduler component (scheduler/scheduler_config.json) and in
# model_index.json (the pipeline's own config)
SCHEDULER_FIELDS = ("objective", "schedule", "n_steps", "beta_min", "beta_max", "step_kind")
INDEX_FIELDS = ("cond", "img_size", "text_prior", "prior_k", "prior_guidance", "prior_guidance_start", "holdout")


@dataclass(frozen=True)
class SamplingConfig:
    """What sampling needs of a run: its objective and schedule, the latent shape and how to decode it.

    `SamplingConfig.of(train_config)` takes it from a run's config; sampling never needs the rest."""

    objective: str = "ddgan"
    schedule: str = "vp"
    n_steps: int = 4
    beta_min: float | None = None
    beta_max: float | None = None
    step_kind: str = "posterior"
    z_dim: int = 0
    latent_size: int = 32  # the generator's spatial size (img_size / the autoencoder's factor)
    autoencoder: str = "pixels"
    latent_scale: float = 1.0
    # what the model is asked with: labels, embeddings (of this encoder, through this text prior) or nothing
    cond: str = "none"
    img_size: int = 32
    encoder: str | None = None
    text_prior: str = "none"
    prior_k: int = 8
    prior_guidance: float = 1.0
    prior_guidance_start: float = 0.0
    holdout: str = ""  # shapes (colour, shape) pairs the training images never showed (evaluation asks for them)

    @classmethod
    def of(cls, cfg: "TrainConfig | SamplingConfig") -> "SamplingConfig":
        if isinstance(cfg, SamplingConfig):
            return cfg
        same = {f.name: getattr(cfg, f.name) for f in fields(cls) if f.name != "z_dim"}  # the run's, by name
        return cls(**same, z_dim=objectives.get(cfg.objective).z_dim(cfg))

    def sampler(self, sampler: str | None = None, steps: int | None = None) -> tuple[str, int]:
        """(sampler, network calls) this config samples with: the objective's (objectives/), as asked (None: its
        default); one it cannot sample with is one line."""
        return objectives.get(self.objective).sampler(self.n_steps, sampler, steps)


def sample(model: torch.nn.Module, config: "SamplingConfig | TrainConfig", n: int, *, cond: Tensor | None = None,
           guidance: float = 1.0, sampler: str | None = None, steps: int | None = None,
           rng: torch.Generator | None = None, device: torch.device | str = "cpu",
           uncond: Tensor | None = None, space: LatentSpace | None = None,
           z_rng: torch.Generator | None = None, callback: Callback | None = None,
           decode_dtype: torch.dtype = torch.float32) -> Tensor:
    """n images in [-1, 1] from a trained generator with the run's own schedule and objective (`config`: a
    `SamplingConfig` or a run's config), through the sampler it names (`samplers.SAMPLERS`); a latent run's
    samples are decoded by its autoencoder (`space`, or the one the config names, decoding in `decode_dtype`; the
    CLI and the web page ask `cpu.fast_decode_dtype`, bfloat16 on a CPU with native bf16)."""
    config = SamplingConfig.of(config)
    schedule = diffusion.make_schedule(config.schedule, config.n_steps, config.beta_min, config.beta_max)
    device = torch.device(device)
    x = randn((n, model.config.image_channels, config.latent_size, config.latent_size), rng, device)
    name, calls = config.sampler(sampler, steps)
    options = objectives.get(config.objective).sampler_options(config.step_kind, config.z_dim, z_rng)
    denoiser = Guided(model, cond, guidance, uncond)
    x = SAMPLERS[name](denoiser, x, schedule, steps=calls, rng=rng, callback=callback, **options)
    if space is None and config.autoencoder == "pixels":
        return x.clamp(-1, 1)
    if space is None:
        space = run_latent_space(config.autoencoder, config.latent_scale, str(torch.device(device)),
                                 decode_dtype)
    return space.decode(x)


def sample_batches(model: torch.nn.Module, config: "SamplingConfig | TrainConfig", n: int, *,
                   cond: Tensor | None = None, batch_size: int = 64, rng: torch.Generator | None = None,
                   device: torch.device | str = "cpu", **options) -> Iterator[Tensor]:
    """`sample` of n images (rows of `cond`) in batches of at most `batch_size`, yielded on the CPU as they are
    made: memory is one batch's, whatever n is. One `rng` runs through the batches in order; `options` are
    `sample`'s (guidance, sampler, steps, uncond, decode_dtype)."""
    if batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {batch_size}")
    if cond is not None and len(cond) != n:
        raise UserError(f"{len(cond)} conditions for {n} images; give one per image")
    config = SamplingConfig.of(config)
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        chunk = None if cond is None else cond[start:stop].to(device)
        yield sample(model, config, stop - start, cond=chunk, rng=rng, device=device, **options).cpu()


@functools.lru_cache(maxsize=4)
def run_latent_space(spec: str, scale: float, device: str, decode_dtype: torch.dtype = torch.float32):
    """A run's autoencoder, loaded once per process (sampling in batches would otherwise reload it)."""

    return load_latent_space(spec, device, scale=scale, decode_dtype=decode_dtype)


def load_generator(path: str | Path, ema: bool = True, device: torch.device | str = "cpu"):
    """(generator, config) from a run folder (its latest checkpoint), one checkpoint folder, or an exported model
    folder (`cclddg export`; its config is then a `SamplingConfig`)."""
    if is_model_folder(path):
        if not ema:
            raise UserError(f"{path} is an exported model: it holds one generator (chosen at export); drop --no_ema")
        return load_model_folder(path, device)
    ckpt = resolve_checkpoint(Path(path))
    cfg = load_config(ckpt)
    name = "generator_ema" if ema and (ckpt / "generator_ema").exists() else "generator"
    model = load_model(UNet, ckpt / name).to(device).eval()
    return model, cfg


def image_size_of(path: str | Path) -> int:
    """The image size a run or model folder samples at, read from its config (nothing loads): for size checks
    before any work."""
    if is_model_folder(path):
        return int(check_model_folder(path)["img_size"])
    return int(load_config(resolve_checkpoint(Path(path))).img_size)


def is_model_folder(path: str | Path) -> bool:
    """An exported model folder (diffusers' layout: model_index.json + a folder per component; model_folder.py)."""
    return (Path(path) / "model_index.json").is_file()


def folder_sampling_config(index: dict, scheduler: dict, unet: dict, vae: dict | None, autoencoder: str = "vae",
                           encoder: str | None = None) -> SamplingConfig:
    """The SamplingConfig of a model folder from its configs (model_index.json, the scheduler's, the UNet's and the
    autoencoder's, whose scaling_factor is the latent scale); what an older folder lacks takes SamplingConfig's
    default."""
    takes_z = objectives.get(scheduler["objective"]).takes_z
    return SamplingConfig(**{k: scheduler[k] for k in SCHEDULER_FIELDS if k in scheduler},
                          z_dim=unet.get("z_dim", 0) if takes_z else 0,
                          latent_size=unet.get("sample_size") or index["img_size"],
                          autoencoder="pixels" if vae is None else autoencoder,
                          latent_scale=1.0 if vae is None else float(vae["scaling_factor"]), encoder=encoder,
                          **{k: index[k] for k in INDEX_FIELDS if k in index})


def load_model_folder(folder: str | Path,
                      device: torch.device | str = "cpu") -> tuple[UNet, SamplingConfig]:
    """(generator, SamplingConfig) of a model folder, for sampling and eval as from a run: its autoencoder and
    embedder are named by specs into the folder (`own|taesd:FOLDER/vae`, `model:FOLDER`), resolved when this runs.
    (`model_folder.CCLDDGPipeline` is the diffusers-style way to the same folder.)"""
    folder = Path(folder).resolve()
    index = check_model_folder(folder)  # every file, before anything loads (folder_check.py)
    vae = read_json(folder / "vae" / "config.json", "the vae's config") if present(index.get("vae")) else None
    autoencoder = None if vae is None else \
        f"{'taesd' if vae.get('_class_name') == 'AutoencoderTiny' else 'own'}:{folder / 'vae'}"
    encoder = f"model:{folder}" if present(index.get("embedder")) else None
    config = folder_sampling_config(index, read_json(folder / "scheduler" / "scheduler_config.json", "the scheduler's config"),
                                    read_json(folder / "unet" / "config.json", "the unet's config"), vae,
                                    autoencoder or "pixels", encoder)
    return load_model(UNet, folder / "unet").to(device).eval(), config


READ_SIDE = 1024  # prompt images are shrunk to at most this side on reading: embedders see 224 px or less


def read_image(path: str | Path) -> Tensor:
    """An image file -> (3, H, W) in [-1, 1], at most READ_SIDE pixels a side; an unreadable or huge file (a
    decompression bomb) is one clear error."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.draft("RGB", (READ_SIDE, READ_SIDE))  # JPEGs decode at a reduced size
                image = image.convert("RGB")
                image.thumbnail((READ_SIDE, READ_SIDE))
                return image_to_tensor(image)
    except FileNotFoundError:
        raise UserError(f"image {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"image {path} is a folder; give an image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"image {path} is too large to read safely (more than {Image.MAX_IMAGE_PIXELS:,} pixels); "
                        "give a smaller image") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"cannot read image {path}: {type(exc).__name__}; give a PNG or JPEG file") from None


def prompt_image(image: Any) -> Tensor:
    """A prompt image as the conditioner takes it, (3, H, W) in [-1, 1]: from a PIL image, a file path (read_image)
    or such a tensor; anything else is one line."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image_to_tensor(image)
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, Tensor) and image.ndim == 3 and image.shape[0] == 3:
        return image
    raise UserError(f"an image prompt is a PIL image, a file path or a (3, H, W) tensor, not {type(image).__name__}")


def load_fitting_embedder(spec: str, model: torch.nn.Module, device: torch.device | str = "cpu"):
    """The embedder of `spec`, refused in one line unless its width is the generator's condition width."""
    embedder = load_embedder(spec, device)
    if embedder.dim != model.config.cond_dim:
        raise UserError(f"the encoder {spec} gives {embedder.dim}-d embeddings but the generator expects "
                        f"{model.config.cond_dim}-d: give the run's own --encoder")
    return embedder


def run_text_prior(path: str | Path, cfg: "TrainConfig | SamplingConfig", dim: int, **overrides) -> TextPrior:
    """A run's (or model folder's) text prior, its settings overridden where given (`cclddg sample/eval --text_prior
    ... --prior_guidance ...`: `overrides` by the config's names, None = not given)."""
    return text_prior_of(path, PriorSettings.of(cfg, **overrides), dim)


def load_prompted(path: str | Path, *, ema: bool = True, encoder: str | None = None,
                  device: torch.device | str = "cpu", **prior_overrides) -> tuple[torch.nn.Module, TrainConfig,
                                                                                PromptConditioner]:
    """(generator, config, conditioner) of an embedding-conditioned run or model folder: what `sample_batches`
    needs to sample for prompts. The encoder is the run's (or `encoder`, a spec of the same space); `text_prior=`,
    `prior_k=`, `prior_guidance=`, `prior_guidance_start=` override the run's text prior."""
    model, cfg = load_generator(path, ema=ema, device=device)
    kind = conditioning.get(cfg.cond)
    if not kind.uses_encoder:
        raise UserError(f"{path} is {kind.described}, not on embeddings: prompts need a run trained with "
                        f"--encoder; {kind.how_to_ask(CLI_NAMES)}")
    if not model.config.cond_dim:
        raise UserError(f"{path}: its generator never saw the embedding (--use_cloob_unet false); it cannot follow prompts")
    embedder = load_fitting_embedder(encoder or cfg.encoder, model, device)
    return model, cfg, PromptConditioner(embedder, run_text_prior(path, cfg, embedder.dim, **prior_overrides))


class PromptPipeline:
    """Deprecated: sample with `CCLDDGPipeline` (`CCLDDGPipeline.from_run(RUN)` or `.from_pretrained(FOLDER)`),
    or with `load_prompted` and `sample_batches`. Kept, warning, for code written against it:

        pipe = PromptPipeline.from_run("runs/text2img")
        images = pipe(["a red circle in the top left"], n=4, guidance=3.0, seed=0)
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, embedder, device: torch.device | str = "cpu",
                 prior: TextPrior | None = None):
        warnings.warn("PromptPipeline is deprecated: use cclddg.CCLDDGPipeline.from_run(run) (or from_pretrained) "
                      "and call it with prompt=, num_images_per_prompt=, guidance_scale=, generator=",
                      FutureWarning, stacklevel=2)
        self.model, self.cfg, self.embedder, self.device = model, cfg, embedder, torch.device(device)
        self.prompts = PromptConditioner(embedder, prior)

    @classmethod
    def from_run(cls, path: str | Path, device: torch.device | str = "cpu", ema: bool = True,
                 encoder: str | None = None, **prior_overrides) -> "PromptPipeline":
        """The deprecated way to `load_prompted`."""
        model, cfg, prompts = load_prompted(path, ema=ema, encoder=encoder, device=device, **prior_overrides)
        return cls(model, cfg, prompts.embedder, device, prompts.prior)

    def condition(self, prompts: Sequence[str] | None = None, images: Sequence[Tensor] | None = None,
                  image_weight: float = 0.5, n: int = 1, seed: int = 0) -> Tensor:
        """(rows * n, dim): n conditions per row, a prompt's, an image's, or (both given, pairwise) their
        normalised mix; see `PromptConditioner`."""
        return self.prompts(prompts, images, image_weight, n, seed)

    def negative(self, prompt: str | None) -> Tensor | None:
        """The embedding guidance pushes away from instead of the null one (None: the null embedding)."""
        return self.prompts.negative(prompt)

    @torch.no_grad()
    def batches(self, cond: Tensor | PromptConditions, n: int = 1, guidance: float = 1.0, seed: int = 0,
                negative: Tensor | None = None, sampler: str | None = None, steps: int | None = None,
                batch_size: int = 64) -> Iterator[Tensor]:
        """Batches of (≤ batch_size, 3, H, W) in [-1, 1] on the CPU: n samples per row of `cond`, in order; the
        same noise for the same seed and batch size."""
        rng = torch.Generator().manual_seed(seed)
        c = cond if n == 1 else cond[:].repeat_interleave(n, dim=0)
        yield from sample_batches(self.model, self.cfg, len(c), cond=c, batch_size=batch_size, rng=rng,
                                  device=self.device, guidance=guidance, sampler=sampler, steps=steps,
                                  uncond=None if negative is None else negative.to(self.device))

    def generate(self, cond: Tensor, n: int = 1, guidance: float = 1.0, seed: int = 0,
                 negative: Tensor | None = None, sampler: str | None = None, steps: int | None = None,
                 batch_size: int = 64) -> Tensor:
        """(rows * n, 3, H, W) in [-1, 1]: n samples per row of `cond`, made in batches of `batch_size`."""
        return torch.cat(list(self.batches(cond, n, guidance, seed, negative, sampler, steps, batch_size)))

    def __call__(self, prompts: str | Sequence[str] | None = None, images: Sequence | None = None,
                 image_weight: float = 0.5, negative_prompt: str | None = None, n: int = 1,
                 guidance: float = 1.0, seed: int = 0, batch_size: int = 64) -> list:
        """PIL images: n per prompt (or image), prompt-major order, made in batches of `batch_size`."""
        if isinstance(prompts, str):
            prompts = [prompts]
        cond = self.condition(prompts, [prompt_image(i) for i in images or []], image_weight, n=n, seed=seed)
        negative = self.negative(negative_prompt)
        return [tensor_to_image(x) for batch in self.batches(cond, 1, guidance, seed, negative, batch_size=batch_size)
                for x in batch]
