"""Training configuration: one flat dataclass, its numeric ranges, and the named presets.

A preset fills every field; flags the user gives override it (`run_config.resolve`, the one resolution step,
which also validates). The configs are frozen: once resolved nothing changes them (a new value is a new config,
`dataclasses.replace`). The resolved config is saved in the run folder, so a run can be resumed or sampled
without repeating its flags.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cclddg.errors import UserError
from cclddg.options import (
    AT_LEAST_1,
    BELOW_1,
    FRACTION,
    GUIDANCE,
    NON_NEGATIVE,
    POSITIVE,
    SEEDS,
    THREADS,
    Range,
    check_fields,
)

STEP_KINDS = ("posterior", "renoise")
# How a text prompt's embedding becomes a condition at sampling (priors/__init__.py).
TEXT_PRIORS = ("none", "gap", "retrieval", "posterior", "flow")
PRIOR_SOURCES = ("captions", "pseudo-text")  # what the learned prior is trained on (priors/flow.py)
OPTIMIZERS = ("adam", "adamw")
PRECISIONS = ("no", "fp16", "bf16")
TEXT_TOWERS = ("minilm", "bpe")  # the own CLOOB's text tower: the frozen sentence encoder + a head, or BPE from scratch
# What maps the frozen sentence features into the joint space: a trained MLP or linear head, or nothing ("locked",
# LiT: the sentence encoder's own space is the joint space and only the image tower learns).
TEXT_HEADS = ("mlp", "linear", "locked")


# TrainConfig fields the data decides (a latent cache's channels, downsampling and scale; the shapes pairs it holds
# out), never flags: resolution
# (`run_config.resolve` for a cache given as --data, `run_config.with_cache` for a source the run encodes) sets them.
DERIVED_FIELDS = ("latent_channels", "latent_factor", "latent_scale", "holdout")


class JsonConfig:
    """JSON round trip for the flat config dataclasses (saved in run folders, read back on resume)."""

    KIND: ClassVar[str] = "config"  # named in the unknown-keys error
    TUPLE_FIELDS: ClassVar[tuple[str, ...]] = ()  # JSON gives lists; these come back as tuples

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: Any):
        """The config from (JSON) values; a wrong key, type or range is one line (`options.check_fields`)."""
        if not isinstance(values, dict):
            raise UserError(f"a {cls.KIND} is a JSON object of settings, not a {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise UserError(f"unknown {cls.KIND} keys {', '.join(unknown[:5])}{more} (a newer cclddg's, or not a "
                            f"{cls.KIND} at all)")
        values = {k: tuple(v) if k in cls.TUPLE_FIELDS and isinstance(v, list) else v for k, v in values.items()}
        cfg = cls(**values)
        check_fields(cfg)
        return cfg


@dataclass(frozen=True)
class TrainConfig(JsonConfig):
    """Everything that defines a training run. Field names follow the seed project's flags."""

    preset: str = "ddgan"
    objective: str = "ddgan"
    # data and conditioning
    data: str = "shapes"  # a data source (shapes:64, emoji, folder:PATH ...) or a latent cache from `cclddg encode`
    img_size: int = 32
    autoencoder: str = "pixels"  # the latent space: pixels, own:RUN, kl-f8:PATH, taesd:PATH
    # derived from the data, not settings (DERIVED_FIELDS): the latent cache's shape and scale, set by resolution
    latent_channels: int = 3
    latent_factor: int = 1
    latent_scale: float = 1.0
    holdout: str = ""  # shapes:...:holdout=...: the (colour, shape) pairs no training image shows (data/shapes.py)
    flip: bool = False  # train on the cache's flipped latents half of the time (not for shapes: left/right)
    cond: str = "labels"
    pct_zeros: float = 0.1
    # embedding conditioning (cond="embedding"): the encoder, the fraction of examples conditioned on their
    # caption's text embedding instead of their image embedding, and which nets see the embedding
    encoder: str | None = None
    pct_text: float = 0.0
    # language-free training and text prompts (conditioning/embedding.py): LAFITE's pseudo-text noise on image
    # embeddings in training, and how a text prompt's embedding is mapped at sampling (none, gap, retrieval)
    pseudo_text_xi: float = 0.0
    text_prior: str = "none"
    prior_k: int = 8
    prior_guidance: float = 1.0  # the learned prior's classifier-free guidance (text_prior flow) ...
    prior_guidance_start: float = 0.0  # ... from this flow time on (priors/flow.py)
    prior_steps: int = 3000  # text_prior flow: the learned prior's training steps, before the generator's
    use_cloob_unet: bool = True
    use_cloob_disc: bool = True
    data_size: int = 20000  # examples used (a real source's default: 0 = all it has)
    cache_dir: str | None = None
    workers: int = 2  # processes that read and decode a real source's images while it is encoded
    # diffusion
    n_steps: int = 4
    schedule: str = "vp"
    beta_min: float | None = None
    beta_max: float | None = None
    step_kind: str = "posterior"
    # generator
    n_channels_unet: int = 64
    ch_mults: tuple[int, ...] = (1, 2, 2)
    is_attn: tuple[bool, ...] = (False, False, False)
    n_blocks: int = 1
    z_dim: int = 16
    n_z_channels: int = 64
    n_cond_channels: int = 128
    n_cond_channels_disc: int = -1
    n_time_channels: int = -1
    denom_factor: float = 16.0
    dropout: float = 0.0
    injection: str = "adagn"
    coord_channels: bool = True
    cond_map_size: int = 0
    narrow_before_upsample: bool = False  # the seed's up path: a level's last block narrows before the upsample
    # discriminator
    n_channels_disc: int = 48
    ch_mults_disc: tuple[int, ...] = (1, 2, 2)
    is_attn_disc: tuple[bool, ...] = (False, False, False)
    n_blocks_disc: int = 1
    mid_block_disc: bool = False  # the seed's discriminator: a middle block (res, attention, res) at the bottom
    # optimisation
    batch_size: int = 64
    n_batches: int = 2000
    max_minutes: float = 0.0
    lr_gen: float = 1.6e-4
    lr_disc: float = 1.25e-4
    optimizer: str = "adam"
    adam_betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    ema_decay: float = 0.999
    r1_gamma: float = 0.05
    lazy_reg: int = 15
    recon_loss_scale: float = 0.0
    lr_warmup: int = 0  # steps of linear learning-rate warmup (large global batches)
    lr_decay: int = 0  # the step where a cosine decay of the learning rates reaches 0 (0: constant rates)
    # scale: batch_size is per process and per micro-batch; global batch = batch_size × processes × grad_accum
    grad_accum: int = 1
    mixed_precision: str = "no"
    channels_last: bool = False
    compile: bool = False
    deterministic: bool = False
    skip_nonfinite: bool = False
    # bookkeeping
    seed: int = 0
    log_every: int = 10
    log_images_every: int = 500
    save_models_every: int = 1000
    kid_every: int = 0  # embedding runs: KID on the run's own features every this many steps (0: off)
    kid_n: int = 256  # images of each set per KID (training/kid_monitor.py)
    wandb_project: str | None = None
    tensorboard: bool = True
    threads: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    # What follows from the fields, in one place (never flags, never in config.json).
    @property
    def latent_size(self) -> int:
        """The generator's spatial size: the image size over the autoencoder's downsampling."""
        return self.img_size // self.latent_factor

    KIND: ClassVar[str] = "train config"
    TUPLE_FIELDS: ClassVar[tuple[str, ...]] = ("ch_mults", "is_attn", "ch_mults_disc", "is_attn_disc", "adam_betas")
    RANGES: ClassVar[dict[str, Range]] = {
        "img_size": Range(1, 8192), "latent_channels": Range(1, 4096), "latent_factor": Range(1, 1024),
        "latent_scale": POSITIVE, "pct_zeros": BELOW_1, "pct_text": FRACTION, "pseudo_text_xi": NON_NEGATIVE,
        "prior_k": AT_LEAST_1, "prior_guidance": GUIDANCE, "prior_guidance_start": BELOW_1,
        "prior_steps": AT_LEAST_1, "data_size": NON_NEGATIVE, "workers": Range(0, 256), "n_steps": Range(1, 100_000),
        "beta_min": POSITIVE, "beta_max": POSITIVE, "n_channels_unet": Range(1, 8192), "ch_mults": Range(1, 64),
        "n_blocks": Range(1, 64), "z_dim": Range(0, 65536), "n_z_channels": Range(1, 65536),
        "n_cond_channels": Range(1, 65536), "n_cond_channels_disc": Range(-1, 65536), "n_time_channels": Range(-1, 65536),
        "denom_factor": POSITIVE, "dropout": BELOW_1, "cond_map_size": Range(0, 1024),
        "n_channels_disc": Range(1, 8192), "ch_mults_disc": Range(1, 64), "n_blocks_disc": Range(1, 64),
        "batch_size": Range(1, 1 << 20), "n_batches": AT_LEAST_1, "max_minutes": NON_NEGATIVE, "lr_gen": POSITIVE,
        "lr_disc": POSITIVE, "adam_betas": BELOW_1, "weight_decay": NON_NEGATIVE, "grad_clip": NON_NEGATIVE,
        "ema_decay": BELOW_1, "r1_gamma": NON_NEGATIVE, "lazy_reg": AT_LEAST_1, "recon_loss_scale": NON_NEGATIVE,
        "lr_warmup": NON_NEGATIVE, "lr_decay": NON_NEGATIVE, "grad_accum": Range(1, 1 << 20), "seed": SEEDS,
        "log_every": AT_LEAST_1, "log_images_every": AT_LEAST_1, "save_models_every": AT_LEAST_1, "threads": THREADS,
        "kid_every": NON_NEGATIVE, "kid_n": Range(2, 100_000),
    }


# The seed project's recipe (train_cclddg.py): schedule 0.3..0.9 over 5 steps, the x_{t-1} fake step
# re-noised from x0, reconstruction loss 1, AdamW with weight decay 1e-6, R1 on every step and no EMA.
# Its multipliers (1,2,2,4) were cumulative, i.e. widths (1,2,4,16) in ours.
SEED = dict(
    objective="ddgan", img_size=128, n_steps=5, schedule="seed", beta_min=0.3, beta_max=0.9,
    step_kind="renoise", n_channels_unet=32, ch_mults=(1, 2, 4, 16), is_attn=(False, False, True, True),
    n_blocks=2, z_dim=8, n_z_channels=16, n_cond_channels=256, denom_factor=16.0, injection="add",
    n_channels_disc=32, ch_mults_disc=(1, 2, 4, 16), is_attn_disc=(False, False, True, True),
    n_blocks_disc=2, batch_size=128, n_batches=10, lr_gen=1e-4, lr_disc=4e-5, optimizer="adamw",
    adam_betas=(0.9, 0.999), weight_decay=1e-6, ema_decay=0.0, r1_gamma=1.0, lazy_reg=1,
    recon_loss_scale=1.0, log_images_every=50, save_models_every=500, pct_zeros=0.1, coord_channels=False,
    narrow_before_upsample=True, mid_block_disc=True,
)

# DDGAN (Xiao et al. 2022): posterior fake step, VP schedule with T=4, Adam (0.5, 0.9), lazy R1, EMA.
DDGAN = dict(objective="ddgan", schedule="vp", n_steps=4, step_kind="posterior", optimizer="adam",
             adam_betas=(0.5, 0.9), r1_gamma=0.05, lazy_reg=15, ema_decay=0.999)

# The standard DDPM baseline: epsilon prediction, linear schedule, 1000 steps, no latent z.
DIFFUSION = dict(objective="diffusion", schedule="linear", n_steps=1000, z_dim=0, optimizer="adam",
                 adam_betas=(0.9, 0.999), lr_gen=2e-4, ema_decay=0.999, recon_loss_scale=0.0)

# DDGAN tuned to learn fast per CPU-second on 32x32 shapes (measured, see the README): a gentler VP
# schedule (b_max 12: ᾱ = .67, .21, .033, .0024, so x_{T-1} still shows the content and D can judge the
# first step), narrow nets, one block per level, high learning rates, the seed's reconstruction term,
# coordinate channels and a spatial conditioning map at the bottleneck (labels can say where, not only what).
FAST = dict(DDGAN, beta_max=12.0, img_size=32, n_channels_unet=32, ch_mults=(1, 2, 2), is_attn=(False, False, False), n_blocks=1,
            n_channels_disc=32, ch_mults_disc=(1, 2, 2), is_attn_disc=(False, False, False), n_blocks_disc=1,
            batch_size=32, lr_gen=5e-4, lr_disc=5e-4, recon_loss_scale=1.0, coord_channels=True, cond_map_size=8,
            n_batches=100_000, log_images_every=500, save_models_every=500, log_every=50)

# The seed's four demos. Pixel DDPM, latent DDPM (needs --autoencoder or a latent cache as --data), pixel
# DDGAN and the CLOOB-conditioned latent DDGAN: FAST's recipe on 64x64 images in a latent space, conditioned
# on CLOOB embeddings of images and, half of the time, of their captions (needs --encoder or a cache with
# embeddings). FAST's widths suit the 16x16x4 latents of the own autoencoder (factor 4): the spatial
# conditioning map sits at the 4x4 bottleneck.
STANDARD_DIFFUSION = DIFFUSION
LATENT_DIFFUSION = dict(DIFFUSION, img_size=64, needs_latents=True)
# Text reaches it through the learned prior (priors/flow.py), guided 5x from flow time 0.3: of the priors measured
# on the demo (README, "Variety and composition") the one with the data's variety at retrieval's 99.6%.
CCLDDG = dict(FAST, img_size=64, cond="embedding", pct_text=0.0, pseudo_text_xi=0.5, text_prior="flow",
              prior_guidance=5.0, prior_guidance_start=0.3, needs_latents=True, cond_map_size=4, batch_size=64)

PRESETS: dict[str, dict[str, Any]] = {
    "standard-diffusion": STANDARD_DIFFUSION, "latent-diffusion": LATENT_DIFFUSION, "ddgan": DDGAN,
    "cclddg": CCLDDG, "fast": FAST, "seed": SEED, "diffusion": DIFFUSION,
}


# ---- the own CLOOB's and the own autoencoder's runs (`cclddg train-cloob`, `cclddg train-ae`) ----------
# The ranges of the fields both share: the loop, logging, checkpoints, held-out size, threads and workers.
SMALL_RUN_RANGES: dict[str, Range] = {
    "seed": SEEDS, "n_batches": AT_LEAST_1, "max_minutes": NON_NEGATIVE, "log_every": AT_LEAST_1,
    "save_every": AT_LEAST_1, "eval_size": Range(1, 1_000_000), "threads": THREADS, "workers": Range(0, 256),
}

@dataclass(frozen=True)
class CLOOBTrainConfig(JsonConfig):
    data: str = "shapes"
    img_size: int = 32
    train_size: int = 20000
    seed: int = 0
    dim: int = 0  # 0: the sentence encoder's width (384) with a locked text head, else 256
    widths: tuple[int, ...] = (32, 64, 128)
    text_tower: str = "minilm"
    text_head: str = "mlp"
    center_text: bool = False  # locked head: subtract the training captions' mean sentence feature (a fixed map)
    text_hidden: int = 512
    inv_tau: float = 30.0
    scale_hopfield: float = 15.0
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 100
    n_batches: int = 3000
    max_minutes: float = 0.0
    log_every: int = 50
    save_every: int = 500
    eval_size: int = 1000
    threads: int = 0
    workers: int = 2

    KIND: ClassVar[str] = "train-cloob config"
    TUPLE_FIELDS: ClassVar[tuple[str, ...]] = ("widths",)
    RANGES: ClassVar[dict[str, Range]] = {
        "img_size": Range(1, 8192), "train_size": Range(2, 10_000_000), "dim": Range(0, 65536),
        "widths": Range(1, 8192), "text_hidden": Range(0, 65536), "inv_tau": POSITIVE, "scale_hopfield": POSITIVE,
        "batch_size": Range(2, 1 << 20), "lr": POSITIVE, "weight_decay": NON_NEGATIVE, "warmup": NON_NEGATIVE,
        **SMALL_RUN_RANGES,
    }

    def validate(self) -> None:
        check_fields(self)
        if self.text_tower not in TEXT_TOWERS:
            raise UserError(f"--text_tower {self.text_tower!r} is not valid; choose one of {', '.join(TEXT_TOWERS)}")
        if self.text_head not in TEXT_HEADS:
            raise UserError(f"--text_head {self.text_head!r} is not valid; choose one of {', '.join(TEXT_HEADS)}")
        if self.center_text and self.text_head != "locked":
            raise UserError("--center_text is the fixed map of a locked text head: add --text_head locked")
        if self.text_head == "locked" and self.text_tower != "minilm":
            raise UserError("--text_head locked keeps the frozen sentence encoder's space: it needs --text_tower minilm")
        if self.batch_size < 2 or self.batch_size > self.train_size:
            raise UserError(f"--batch_size must be in [2, train_size={self.train_size}] (contrastive learning "
                            f"needs negatives), got {self.batch_size}")


@dataclass(frozen=True)
class AETrainConfig(JsonConfig):
    data: str = "shapes"
    img_size: int = 64
    train_size: int = 20000
    seed: int = 0
    widths: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_groups: int = 8
    crop: int = 32
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 100
    mse_weight: float = 1.0
    kl_weight: float = 1e-6
    sample_posterior: bool = False
    adv_weight: float = 0.0
    adv_start: int = 1000
    n_batches: int = 3000
    max_minutes: float = 0.0
    log_every: int = 50
    save_every: int = 500
    eval_size: int = 500
    threads: int = 0
    workers: int = 2

    KIND: ClassVar[str] = "train-ae config"
    TUPLE_FIELDS: ClassVar[tuple[str, ...]] = ("widths",)
    RANGES: ClassVar[dict[str, Range]] = {
        "img_size": Range(1, 8192), "train_size": Range(1, 10_000_000), "widths": Range(1, 8192),
        "latent_channels": Range(1, 1024), "layers_per_block": Range(1, 64), "norm_groups": Range(1, 1024),
        "crop": Range(0, 8192), "batch_size": Range(1, 1 << 20), "lr": POSITIVE, "warmup": NON_NEGATIVE,
        "mse_weight": NON_NEGATIVE, "kl_weight": NON_NEGATIVE, "adv_weight": NON_NEGATIVE, "adv_start": NON_NEGATIVE,
        **SMALL_RUN_RANGES,
    }

    @property
    def factor(self) -> int:
        return 2 ** (len(self.widths) - 1)

    def validate(self) -> None:
        check_fields(self)
        if not self.widths:
            raise UserError("--widths needs at least one width, e.g. 16,32,64")
        if any(w % self.norm_groups for w in self.widths):
            raise UserError(f"--widths {','.join(map(str, self.widths))}: every width must be divisible by "
                            f"--norm_groups {self.norm_groups}")
        if self.img_size % self.factor:
            raise UserError(f"--img_size {self.img_size} is not divisible by the downsampling factor {self.factor} "
                            f"of {len(self.widths)} --widths levels")
        if self.crop and (self.crop % self.factor or self.crop > self.img_size):
            raise UserError(f"--crop {self.crop} must be a multiple of the factor {self.factor} and at most "
                            f"--img_size {self.img_size} (0: whole images)")


@dataclass(frozen=True)
class PriorTrainConfig(JsonConfig):
    """`cclddg train-prior`: the learned prior (priors/flow.py) of an embedding run, trained on the run's data."""

    source: str = "captions"  # captions: (caption, image) pairs; pseudo-text: LAFITE noise on the image (no captions)
    text_noise: float = 0.3  # captions: relative noise on the caption's embedding, so captions that mean the same
    #                          share their images (without it the prior learns each wording's few images)
    pseudo_text_xi: float = 1.3  # pseudo-text's relative noise (1.3: cosine ~0.6 to the image, as captions are)
    width: int = 0  # 0: twice the embedding's width, at least 64 (512 for the own CLOOB's 256-d)
    depth: int = 4
    cond_drop: float = 0.1  # conditions dropped to the null one, for the prior's own guidance
    batch_size: int = 512
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    mixed_precision: str = "no"  # bf16: autocast the MLP (3x a step on a CPU with native bf16; weights stay fp32)
    n_batches: int = 3000
    max_minutes: float = 0.0
    eval_size: int = 1000  # examples held out for the report's loss (at most a tenth of them)
    seed: int = 0
    log_every: int = 100
    save_every: int = 1000
    threads: int = 0
    workers: int = 0  # (unused: the prior reads the run's embeddings, not images)
    data: str = ""  # what the embeddings are (recorded; the run's data)

    KIND: ClassVar[str] = "train-prior config"
    RANGES: ClassVar[dict[str, Range]] = {
        "text_noise": NON_NEGATIVE, "pseudo_text_xi": POSITIVE, "width": Range(0, 65536), "depth": Range(1, 64), "cond_drop": BELOW_1,
        "batch_size": Range(1, 1 << 20), "lr": POSITIVE, "warmup": NON_NEGATIVE, "weight_decay": NON_NEGATIVE,
        **SMALL_RUN_RANGES,
    }

    def validate(self) -> None:
        check_fields(self)
        if self.source not in PRIOR_SOURCES:
            raise UserError(f"--source {self.source!r} is not valid; choose one of {', '.join(PRIOR_SOURCES)}")
        if self.mixed_precision not in ("no", "bf16"):
            raise UserError(f"--mixed_precision {self.mixed_precision!r} is not valid for the prior; choose no or bf16")
