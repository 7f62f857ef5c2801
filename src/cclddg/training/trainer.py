"""The training loop for DDGAN and DDPM, on accelerate (CPU, one GPU or many with the same code).

Run folder layout:

    RUN/config.json             the resolved TrainConfig of the run
    RUN/log.jsonl               one JSON object per logged step (losses, D(real), D(fake), samples/s)
    RUN/samples/step_*.png      grids from the EMA generator, fixed noise and conditioning
    RUN/samples/recon_*.png     real x_0, noised x_t and predicted x̂_0 for every step t
                                (latent runs decode every row through the autoencoder)
    RUN/checkpoints/step_*/     the last two checkpoints (see checkpoint.py), `latest` names the newest

Data: a source (`shapes:64`) read on the fly, or a latent cache (`cclddg encode`) read memory-mapped, so a
latent run never runs the autoencoder or the embedder in the loop (only to decode the sample grids). A
latent run on a source (`--autoencoder own:runs/ae --data shapes:64`) first encodes it into a cache in
--cache_dir. The data position is the step: step s of rank r reads examples (s·world + r)·B ... + B-1 of the
deterministic stream, so a resumed run sees exactly the data it would have seen.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from cclddg import diffusion, objectives
from cclddg.config import TrainConfig, is_cache, validate
from cclddg.data.images import make_grid, save_image_atomic
from cclddg.data.sources import open_dataset, open_source, parse_data_spec
from cclddg.errors import UserError
from cclddg.models import Discriminator, UNet
from cclddg.pipeline import ddgan_sample, diffusion_sample
from cclddg.training import checkpoint as ckpt_io
from cclddg.training.ema import ema_update, warmup_decay

# Flags that may change when a run is resumed; everything else must match the run's config.
RESUMABLE_CHANGES = {"workers", "n_batches", "max_minutes", "log_every", "log_images_every", "save_models_every", "wandb_project",
                     "threads", "cache_dir"}


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step and the last checkpoint."""


def label_dim(cfg: TrainConfig, embed_dim: int = 0) -> int:
    """Width of the conditioning vector: the label vector, the embedder's dim, or 0."""
    if cfg.cond == "none":
        return 0
    if cfg.cond == "embedding":
        return embed_dim
    from cclddg.data.shapes import LABEL_DIM

    return LABEL_DIM


def cond_scale(cfg: TrainConfig, embed_dim: int) -> float:
    """Unit embeddings have per-dimension values ~1/sqrt(dim); scaling by sqrt(dim) gives the nets inputs of
    unit variance, like the label vectors' ones (measured: much faster conditioning)."""
    return math.sqrt(embed_dim) if cfg.cond == "embedding" and embed_dim else 1.0


def latent_size(cfg: TrainConfig) -> int:
    return cfg.img_size // cfg.latent_factor


def build_generator(cfg: TrainConfig, embed_dim: int = 0) -> UNet:
    cond_dim = label_dim(cfg, embed_dim) if cfg.use_cloob_unet else 0
    return UNet(image_channels=cfg.latent_channels, n_channels=cfg.n_channels_unet, ch_mults=cfg.ch_mults, is_attn=cfg.is_attn,
                n_blocks=cfg.n_blocks, z_dim=cfg.z_dim if cfg.objective == "ddgan" else 0,
                n_z_channels=cfg.n_z_channels, cond_dim=cond_dim, n_cond_channels=cfg.n_cond_channels,
                n_time_channels=cfg.n_time_channels, denom_factor=cfg.denom_factor, dropout=cfg.dropout,
                injection=cfg.injection, sample_size=latent_size(cfg), coord_channels=cfg.coord_channels,
                cond_map_size=cfg.cond_map_size, cond_scale=cond_scale(cfg, embed_dim))


def build_discriminator(cfg: TrainConfig, embed_dim: int = 0) -> Discriminator:
    cond_dim = label_dim(cfg, embed_dim) if cfg.use_cloob_disc else 0
    n_cond = cfg.n_cond_channels_disc if cfg.n_cond_channels_disc > 0 else cfg.n_cond_channels
    return Discriminator(image_channels=cfg.latent_channels, n_channels=cfg.n_channels_disc, ch_mults=cfg.ch_mults_disc,
                         is_attn=cfg.is_attn_disc, n_blocks=cfg.n_blocks_disc, cond_dim=cond_dim,
                         n_cond_channels=n_cond, n_time_channels=cfg.n_time_channels,
                         denom_factor=cfg.denom_factor, injection=cfg.injection, sample_size=latent_size(cfg),
                         coord_channels=cfg.coord_channels, cond_scale=cond_scale(cfg, embed_dim))


def make_optimizer(cfg: TrainConfig, params, lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)


def grid_requests(rows: int) -> list[dict[str, str]]:
    """One request per grid row, the same in every run so grids compare over time."""
    from cclddg.data.shapes import COLORS, POSITIONS, SHAPES

    return [{"color": COLORS[i % len(COLORS)], "shape": SHAPES[i % len(SHAPES)],
             "position": POSITIONS[(4 * i) % len(POSITIONS)]} for i in range(rows)]


def grid_prompts(rows: int) -> list[str]:
    from cclddg.evaluation.zero_shot import request_prompt

    return [request_prompt(r) for r in grid_requests(rows)]


def grid_conditions(cfg: TrainConfig, rows: int) -> Tensor | None:
    """Fixed label conditioning for the sample grids (embedding runs use the prompts' embeddings)."""
    if cfg.cond != "labels":
        return None
    from cclddg.data.shapes import attrs_to_label

    return torch.stack([torch.from_numpy(attrs_to_label(r)) for r in grid_requests(rows)])


def prepare_run_dir(out: Path, cfg: TrainConfig, resume: bool, write: bool = True) -> TrainConfig:
    """Create the run folder, or check that the run being resumed matches the flags given.

    `write=False` only checks, so slow setup (the embedding cache) never runs for an --out it would refuse.
    """
    config_path = out / "config.json"
    if resume:
        if not config_path.is_file():
            raise UserError(f"--resume: {out} holds no run (no config.json); start it without --resume")
        old = TrainConfig.from_dict(json.loads(config_path.read_text()))
        new, old_d = asdict(cfg), asdict(old)
        clash = [k for k in new if k not in RESUMABLE_CHANGES and new[k] != old_d[k]]
        if clash:
            details = ", ".join(f"{k}: run has {old_d[k]!r}, flags give {new[k]!r}" for k in clash[:4])
            raise UserError(f"cannot resume {out} with a different config ({details}); "
                            "drop those flags or start a new --out")
        return cfg
    if out.exists() and any(out.iterdir()):
        if config_path.exists():
            raise UserError(f"{out} holds another run; pass --resume to continue it or choose a new --out")
        raise UserError(f"{out} is not empty; choose a new or empty --out folder")
    if not write:
        return cfg
    out.mkdir(parents=True, exist_ok=True)
    ckpt_io.write_text_atomic(config_path, cfg.to_json())
    return cfg


class Trainer:
    """Owns the models, optimizers, data stream and run folder of one training run."""

    def __init__(self, cfg: TrainConfig, out: str | Path, resume: bool = False, progress: bool = True):
        from accelerate import Accelerator

        self.cfg = cfg
        self.out = Path(out)
        self.progress = progress
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.set_flush_denormal(True)  # denormals made CPU steps ~10x slower on these machines
        self.accelerator = Accelerator()
        self.device = self.accelerator.device
        rank = self.accelerator.process_index
        # Everything that can reject the config runs before the run folder is touched.
        self.schedule = diffusion.make_schedule(cfg.schedule, cfg.n_steps, cfg.beta_min, cfg.beta_max).to(self.device)
        self.embeddings: dict[str, Tensor] = {}
        self.grid_cond: Tensor | None = None
        self.cache = self.data = self.space = None
        self._perm, self._perm_epoch = None, None  # the cache's order in the current epoch (_cache_order)
        if self.accelerator.is_main_process:  # refuse a bad --out before any slow setup (the main process
            prepare_run_dir(self.out, cfg, resume, write=False)  # alone: the others would see its config.json)
        if is_cache(cfg.data) or cfg.autoencoder != "pixels" or not parse_data_spec(cfg.data).procedural:
            embed_dim = self._open_cache()
        else:
            length = cfg.data_size if cfg.cond == "embedding" else None
            self.data = open_dataset(cfg.data, cfg.img_size, seed=cfg.seed, length=length)
            embed_dim = self._prepare_embeddings() if cfg.cond == "embedding" else 0
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.gen = build_generator(cfg, embed_dim).to(self.device)
        disc = build_discriminator(cfg, embed_dim).to(self.device) if cfg.objective == "ddgan" else None
        if self.accelerator.is_main_process:
            prepare_run_dir(self.out, cfg, resume)
        self.accelerator.wait_for_everyone()
        torch.manual_seed(cfg.seed + 1000 * rank + 1)
        self.ema = copy.deepcopy(self.gen).requires_grad_(False).eval()
        self.opt_g = make_optimizer(cfg, self.gen.parameters(), cfg.lr_gen)
        self.disc = self.opt_d = None
        if cfg.objective == "ddgan":
            self.disc = disc
            self.opt_d = make_optimizer(cfg, self.disc.parameters(), cfg.lr_disc)
            self.gen, self.disc, self.opt_g, self.opt_d = self.accelerator.prepare(
                self.gen, self.disc, self.opt_g, self.opt_d)
        else:
            self.gen, self.opt_g = self.accelerator.prepare(self.gen, self.opt_g)
        self.step = 0
        self.last_checkpoint: Path | None = None
        if resume:
            self._load(ckpt_io.resolve_checkpoint(self.out) if ckpt_io.list_checkpoints(self.out) else None)
        self.log_file = self.out / "log.jsonl"
        self.tracker = None
        if cfg.wandb_project and cfg.wandb_project != "None" and self.accelerator.is_main_process:
            self.tracker = _start_wandb(cfg)

    def _open_cache(self) -> int:
        """Open the latent cache (`--data CACHE`, or the one this run's source is encoded into) and the
        autoencoder that decodes the grids; fill the run's latent settings from the cache."""
        from cclddg.data.latent_cache import LatentCache
        from cclddg.encoders import load_embedder
        from cclddg.latents import load_latent_space

        cfg, acc = self.cfg, self.accelerator
        self.space = load_latent_space(cfg.autoencoder, self.device)  # loaded once: encodes a source, decodes grids
        embedder = load_embedder(cfg.encoder, self.device) if cfg.cond == "embedding" else None
        if is_cache(cfg.data):
            path = Path(cfg.data)
        else:
            if acc.is_main_process:  # one process encodes, the others then read the finished cache
                path = self._encode_source(embedder)
            acc.wait_for_everyone()
            if not acc.is_main_process:
                path = self._encode_source(embedder, progress=False)
        self.cache = LatentCache(path, autoencoder=cfg.autoencoder, encoder=cfg.encoder)
        cfg.latent_channels, cfg.latent_scale = self.cache.channels, self.cache.scale
        cfg.latent_factor, cfg.data_size = self.cache.img_size // self.cache.latent_size, len(self.cache)
        validate(cfg)
        self.cache.check_fits(cfg.cond, cfg.flip)
        self.space.scale = cfg.latent_scale
        if embedder is None:
            return 0
        self.grid_cond = embedder.embed_texts(grid_prompts(6)).cpu()
        return self.cache.embed_dim

    def _encode_source(self, embedder, progress: bool | None = None) -> Path:
        """A latent run on a data source (or a pixel run on a real one): encode `data_size` examples (0: all)
        once into a cache in --cache_dir, so training never decodes an image file or runs the autoencoder."""
        import hashlib

        from cclddg.data.latent_cache import encode_dataset
        from cclddg.encoders import default_cache_dir

        cfg = self.cfg
        key = json.dumps([cfg.data, cfg.img_size, cfg.seed, cfg.data_size, cfg.autoencoder, self.space.fingerprint,
                          cfg.encoder, getattr(embedder, "fingerprint", None), cfg.flip])
        path = Path(cfg.cache_dir or default_cache_dir()) / f"latents-{hashlib.sha1(key.encode()).hexdigest()[:20]}"
        source = open_source(cfg.data, cfg.img_size, seed=cfg.seed, length=cfg.data_size or None)
        out = encode_dataset(source, cfg.data, cfg.seed, cfg.data_size or None, cfg.img_size, self.space, embedder,
                             path, flip=cfg.flip, progress=self.progress if progress is None else progress,
                             workers=0 if parse_data_spec(cfg.data).procedural else cfg.workers)
        skipped = json.loads((out / "cache.json").read_text())["skipped"]
        if skipped["skipped"] and self.accelerator.is_main_process and progress is None:
            from cclddg.data.preprocess import SkipLog

            print(f"{cfg.data}: {SkipLog.from_dict(skipped).summary(named=3)} (also in {out / 'cache.json'})")
        return out

    def _prepare_embeddings(self) -> int:
        """Image and caption embeddings of the whole (finite) dataset, from the cache or computed once."""
        from cclddg.data.embedding_cache import cache_key, dataset_embeddings
        from cclddg.encoders import default_cache_dir, load_embedder

        cfg, acc = self.cfg, self.accelerator
        embedder = load_embedder(cfg.encoder, self.device)
        key = cache_key(cfg.data, cfg.img_size, cfg.seed, cfg.data_size, cfg.encoder, embedder.fingerprint)
        cache_dir = cfg.cache_dir or default_cache_dir()
        if acc.is_main_process:  # one process builds the cache, the others then read it
            self.embeddings = dataset_embeddings(self.data, cfg.data_size, embedder, key, cache_dir, self.progress)
        acc.wait_for_everyone()
        if not acc.is_main_process:
            self.embeddings = dataset_embeddings(self.data, cfg.data_size, embedder, key, cache_dir, False)
        self.grid_cond = embedder.embed_texts(grid_prompts(6)).cpu()
        return embedder.dim

    # ---- data -------------------------------------------------------------------------------------
    def _cache_order(self, positions: range) -> list[int]:
        """Cache indices at global stream positions: epoch e reads a permutation seeded by (seed, e)."""
        n = self.cfg.data_size
        out = []
        for p in positions:
            epoch, k = divmod(p, n)
            if self._perm_epoch != epoch:
                self._perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(n)
                self._perm_epoch = epoch
            out.append(int(self._perm[k]))
        return out

    def batch(self, step: int, drop: bool = True) -> tuple[Tensor, Tensor | None]:
        """The examples of this step and rank: a pure function of the step (exact resume).

        Embedding runs condition each example on its image embedding, or with probability pct_text on
        its caption's text embedding. With `drop`, conditioning is replaced by the null embedding
        with probability pct_zeros (for CFG).
        """
        cfg = self.cfg
        b, world, rank = cfg.batch_size, self.accelerator.num_processes, self.accelerator.process_index
        start = (step * world + rank) * b
        indices = range(start, start + b)
        if self.cache is not None:  # a fresh permutation of the cache each epoch
            indices = self._cache_order(indices)
        elif cfg.cond == "embedding":
            indices = [i % cfg.data_size for i in indices]
        # Grids (drop=False) draw nothing from the RNG, so logging never changes the training stream.
        if self.cache is not None:
            flip = torch.rand(b) < 0.5 if drop and cfg.flip else None
            found = self.cache.get_batch(indices, flip)
            images, labels = found["latents"], found.get("labels")
            embeddings = (found["image_emb"], found["text_emb"]) if cfg.cond == "embedding" else None
        else:
            images, labels, _ = self.data.get_batch(indices)
            idx = torch.tensor(indices)
            embeddings = (self.embeddings["image"][idx], self.embeddings["text"][idx]) if cfg.cond == "embedding" else None
        images = images.to(self.device)
        if cfg.cond == "none":
            return images, None
        if embeddings is not None:  # the image's embedding, or with probability pct_text its caption's
            use_text = torch.rand(b, 1) < cfg.pct_text if drop else torch.zeros(b, 1, dtype=torch.bool)
            labels = torch.where(use_text, embeddings[1], embeddings[0])
        labels = labels.to(self.device)
        if drop and self.cfg.pct_zeros > 0:
            keep = torch.rand(b, 1, device=self.device) >= self.cfg.pct_zeros
            labels = labels * keep
        return images, labels

    # ---- one optimisation step ------------------------------------------------------------------
    def ddgan_step(self, x0: Tensor, cond: Tensor | None) -> dict[str, float]:
        cfg, acc = self.cfg, self.accelerator
        t = objectives.sample_steps(x0.shape[0], cfg.n_steps, x0.device)
        x_prev, x_t = diffusion.q_pair(self.schedule, x0, t)
        z = torch.randn(x0.shape[0], cfg.z_dim, device=x0.device) if cfg.z_dim else None
        cond_g, cond = self._split_cond(cond)
        x0_pred = self.gen(x_t, t, cond_g, z)
        fake_prev = objectives.fake_step(self.schedule, cfg.step_kind, x_t, x0_pred, t)

        lazy = cfg.r1_gamma > 0 and (self.step % cfg.lazy_reg == 0)
        r1_weight = cfg.r1_gamma / 2 * cfg.lazy_reg if lazy else 0.0
        self.disc.requires_grad_(True)
        loss_d, logs = objectives.discriminator_loss(self.disc, x_prev, fake_prev, x_t, t, cond, r1_weight)
        self.opt_d.zero_grad(set_to_none=True)
        acc.backward(loss_d)
        logs["grad_norm_d"] = self._clip(self.disc)
        self.opt_d.step()

        self.disc.requires_grad_(False)  # G's loss needs gradients through D, not for D
        loss_g, logs_g = objectives.generator_loss(self.disc, fake_prev, x_t, t, cond, x0_pred, x0,
                                                   cfg.recon_loss_scale)
        self.opt_g.zero_grad(set_to_none=True)
        acc.backward(loss_g)
        logs_g["grad_norm_g"] = self._clip(self.gen)
        self.opt_g.step()
        self._check_finite(loss_d, loss_g)
        return {**logs, **logs_g}

    def _split_cond(self, cond: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """(generator's conditioning, discriminator's conditioning): None where a net does not see it."""
        return (cond if self.cfg.use_cloob_unet else None), (cond if self.cfg.use_cloob_disc else None)

    def diffusion_step(self, x0: Tensor, cond: Tensor | None) -> dict[str, float]:
        cond = self._split_cond(cond)[0]
        loss, logs = objectives.diffusion_loss(self.gen, self.schedule, x0, cond)
        self.opt_g.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        logs["grad_norm_g"] = self._clip(self.gen)
        self.opt_g.step()
        self._check_finite(loss)
        return logs

    def _clip(self, model: torch.nn.Module) -> float:
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        return float(self.accelerator.clip_grad_norm_(model.parameters(), max_norm))

    def _check_finite(self, *losses: Tensor) -> None:
        if not all(torch.isfinite(loss).item() for loss in losses):
            where = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else \
                "no checkpoint was written yet"
            raise TrainingError(f"non-finite loss at step {self.step + 1}; {where}. "
                                "Lower --lr_gen/--lr_disc or raise --r1_gamma, then --resume")

    def train_step(self) -> dict[str, float]:
        """One optimisation step on this step's batch, then the EMA update."""
        self.gen.train()
        x0, cond = self.batch(self.step)
        step_fn = self.ddgan_step if self.cfg.objective == "ddgan" else self.diffusion_step
        logs = step_fn(x0, cond)
        ema_update(self.ema, self.accelerator.unwrap_model(self.gen), warmup_decay(self.cfg.ema_decay, self.step))
        self.step += 1
        return logs

    # ---- the loop ---------------------------------------------------------------------------------
    def run(self) -> Path:
        cfg, acc = self.cfg, self.accelerator
        bar = tqdm(total=cfg.n_batches, initial=self.step, disable=not (self.progress and acc.is_main_process),
                   desc="train", dynamic_ncols=True)
        tic, seen = time.perf_counter(), 0
        logs: dict[str, float] = {}
        deadline = time.monotonic() + cfg.max_minutes * 60 if cfg.max_minutes else math.inf
        try:
            while self.step < cfg.n_batches:
                if time.monotonic() > deadline:  # the time budget ends the run like its last step would
                    self._log(logs)
                    self.log_images()
                    self.save()
                    break
                logs = self.train_step()
                seen += cfg.batch_size * acc.num_processes
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.n_batches:
                    logs["samples_per_s"] = seen / max(time.perf_counter() - tic, 1e-9)
                    tic, seen = time.perf_counter(), 0
                    self._log(logs)
                    bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items()
                                     if k in ("loss_d", "loss_g", "d_real", "d_fake", "loss")})
                if self.step % cfg.log_images_every == 0 or self.step == cfg.n_batches:
                    self.log_images()
                if self.step % cfg.save_models_every == 0 or self.step == cfg.n_batches:
                    self.save()
        except KeyboardInterrupt:
            bar.close()
            if self.step > 0:
                self.save()
            raise
        bar.close()
        return self.out

    # ---- logging, grids, checkpoints ---------------------------------------------------------------
    def _log(self, logs: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        record = {"step": self.step, **{k: round(float(v), 6) for k, v in logs.items()}}
        with open(self.log_file, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            self.tracker.log(record, step=self.step)

    @torch.no_grad()
    def log_images(self, rows: int = 6, cols: int = 6) -> None:
        """A grid from the EMA generator (fixed noise, fixed conditioning) and a reconstruction grid."""
        if not self.accelerator.is_main_process:
            return
        folder = self.out / "samples"
        folder.mkdir(exist_ok=True)
        cond = grid_conditions(self.cfg, rows) if self.grid_cond is None else self.grid_cond
        cond = cond if self.cfg.use_cloob_unet else None
        if cond is not None:
            cond = cond.to(self.device).repeat_interleave(cols, dim=0)
        rng = torch.Generator(device=self.device).manual_seed(1234)
        size = latent_size(self.cfg)
        shape = (rows * cols, self.cfg.latent_channels, size, size)
        if self.cfg.objective == "ddgan":
            images = ddgan_sample(self.ema, self.schedule, shape, cond, 1.0, self.cfg.step_kind, self.cfg.z_dim,
                                  rng, self.device)
        else:
            images = diffusion_sample(self.ema, self.schedule, shape, cond, 1.0, "ddim", 50, rng, self.device)
        save_image_atomic(make_grid(self.to_pixels(images).cpu(), nrow=cols), folder / f"step_{self.step:07d}.png")
        if self.cfg.objective == "ddgan":
            save_image_atomic(self.reconstruction_grid(), folder / f"recon_{self.step:07d}.png")

    @torch.no_grad()
    def reconstruction_grid(self, n: int = 6) -> Any:
        """Rows: real x_0, then for t = T..1 the noised x_t and the EMA generator's x̂_0 (as the seed logged)."""
        x0, cond = self.batch(0, drop=False)
        n = min(n, x0.shape[0])
        x0, cond = x0[:n], None if cond is None else cond[:n]
        cond = self._split_cond(cond)[0]
        rows = [x0]
        gen = torch.Generator(device=self.device).manual_seed(99)
        for step in range(self.cfg.n_steps, 0, -1):
            t = torch.full((n,), step, dtype=torch.long, device=self.device)
            noise = torch.randn(x0.shape, generator=gen, device=self.device)
            x_t = diffusion.q_sample(self.schedule, x0, t, noise=noise)
            z = torch.randn(n, self.cfg.z_dim, generator=gen, device=self.device) if self.cfg.z_dim else None
            rows += [x_t, self.ema(x_t, t, cond, z)]
        return make_grid(self.to_pixels(torch.cat(rows)).cpu(), nrow=n)

    def to_pixels(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] from model outputs: decoded by the autoencoder in latent runs."""
        return x.clamp(-1, 1) if self.space is None else self.space.decode(x)

    def save(self) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            models = {"generator": acc.unwrap_model(self.gen), "generator_ema": self.ema}
            state: dict[str, Any] = {"step": self.step, "opt_g": self.opt_g.state_dict(),
                                     "torch_rng": torch.get_rng_state()}
            if self.disc is not None:
                models["discriminator"] = acc.unwrap_model(self.disc)
                state["opt_d"] = self.opt_d.state_dict()
            if torch.cuda.is_available():
                state["cuda_rng"] = torch.cuda.get_rng_state_all()
            self.last_checkpoint = ckpt_io.save_checkpoint(self.out, self.step, models, state, self.cfg)
        acc.wait_for_everyone()

    def _load(self, folder: Path | None) -> None:
        if folder is None:
            return
        acc = self.accelerator
        state = ckpt_io.load_state(folder)
        acc.unwrap_model(self.gen).load_state_dict(ckpt_io.load_model(UNet, folder / "generator").state_dict())
        self.ema.load_state_dict(ckpt_io.load_model(UNet, folder / "generator_ema").state_dict())
        self.opt_g.load_state_dict(state["opt_g"])
        if self.disc is not None:
            disc = ckpt_io.load_model(Discriminator, folder / "discriminator")
            acc.unwrap_model(self.disc).load_state_dict(disc.state_dict())
            self.opt_d.load_state_dict(state["opt_d"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step = int(state["step"])
        self.last_checkpoint = folder


def _start_wandb(cfg: TrainConfig):
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb_project needs the wandb package: pip install wandb (or drop the flag)") from None
    return wandb.init(project=cfg.wandb_project, config=asdict(cfg))
