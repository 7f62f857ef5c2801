"""The training loop for DDGAN and DDPM, on accelerate: CPU, one GPU, or several GPUs and nodes with the same code.

Run folder layout:

    RUN/config.json             the resolved TrainConfig of the run
    RUN/log.jsonl               one JSON object per logged step (losses, D(real), D(fake), R1, grad norms,
                                learning rates, samples/s, resident memory); `cclddg plot RUN` draws it
    RUN/tensorboard/            the same scalars and the grids, when tensorboard is installed
    RUN/samples/step_*.png      grids from the EMA generator, fixed noise and conditioning
    RUN/samples/recon_*.png     real x_0, noised x_t and predicted x̂_0 for every step t
                                (latent runs decode every row through the autoencoder)
    RUN/checkpoints/step_*/     the last two checkpoints (see checkpoint.py), `latest` names the newest

Several processes (`accelerate launch` / `torchrun`): data parallel, the same weights on every rank (gradients
are averaged), each rank reads its own examples; logs, grids and checkpoints come from the main process.
`--batch_size` is per process and per micro-batch: the global batch is batch_size × processes × grad_accum.

Data: a source (`shapes:64`) read on the fly, or a latent cache (`cclddg encode`) read memory-mapped, so a
latent run never runs the autoencoder or the embedder in the loop (only to decode the sample grids). A
latent run on a source (`--autoencoder own:runs/ae --data shapes:64`) first encodes it into a cache in
--cache_dir. The data position is a pure function of the step: step s reads the global examples
P(s) ... P(s) + global batch - 1 of the deterministic stream (micro-batch m of rank r the slice
(m·world + r)·B), P(s) = the position stored in the checkpoint it resumed from + (s - its step) · global batch.
With every RNG state in the checkpoint too, a resumed run takes exactly the steps it would have taken.
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cclddg import conditioning, diffusion, objectives
from cclddg.config import PriorTrainConfig, TrainConfig
from cclddg.cpu import native_bf16, tune_cpu
from cclddg.data.images import make_grid, save_image_atomic
from cclddg.data.shapes import grid_requests
from cclddg.encoders import load_embedder
from cclddg.errors import OneLineWarning, TrainingError, UserError, first_line
from cclddg.models import Discriminator, UNet
from cclddg.pipeline import sample
from cclddg.priors import PriorSettings, TextPrior, load_flow_prior, make_text_prior
from cclddg.run_config import with_cache
from cclddg.storage import load_model
from cclddg.training import checkpoint as ckpt_io
from cclddg.training import precision
from cclddg.training.data import TrainingData
from cclddg.training.ema import ema_update, warmup_decay
from cclddg.training.kid_monitor import KidMonitor
from cclddg.training.loop import TrainingLoop
from cclddg.training.optimisation import NetOptimizer, NonFinitePolicy
from cclddg.training.prior_trainer import prior_finished, train_run_prior
from cclddg.training.run_log import RunLog

# Flags that may change when a run is resumed; everything else must match the run's config.
# The learning rates, R1 and gradient clipping may change too: a run stopped by a non-finite loss is resumed with
# them lowered/raised (its own advice); the change is written to config.json and noted in log.jsonl.
RESUMABLE_CHANGES = {"kid_every", "kid_n", "text_prior", "prior_k", "prior_guidance", "prior_guidance_start", "prior_steps", "workers", "n_batches", "max_minutes", "log_every", "log_images_every",
                     "save_models_every", "wandb_project", "tensorboard", "threads", "cache_dir", "grad_accum", "mixed_precision",
                     "channels_last", "compile", "deterministic", "skip_nonfinite", "lr_gen", "lr_disc", "r1_gamma",
                     "grad_clip"}
# Changes on resume that alter the optimisation: noted in log.jsonl at the resumed step.
NOTED_CHANGES = {"lr_gen", "lr_disc", "r1_gamma", "grad_clip", "skip_nonfinite"}


class BadCheckpointWarning(OneLineWarning):
    """A damaged checkpoint was passed over on --resume (the CLI prints it as one line)."""


def build_nets(cfg: TrainConfig, embed_dim: int = 0) -> tuple[UNet, Discriminator | None]:
    """A run's freshly initialised nets (its objective's: the generator, and a discriminator or None), conditioned
    as its conditioning kind says (`embed_dim`: the run's embedder's width, 0 without one)."""
    kind = conditioning.get(cfg.cond)
    return objectives.get(cfg.objective).build(cfg, kind.width(embed_dim), kind.scale(embed_dim))


def prepare_run_dir(out: Path, cfg: TrainConfig, resume: bool, write: bool = True) -> dict[str, tuple[Any, Any]]:
    """The generator run's folder (checkpoint.prepare_run_folder with the settings a resume may change)."""
    return ckpt_io.prepare_run_folder(out, cfg, resume, RESUMABLE_CHANGES, "train", write)


class Trainer(TrainingLoop):
    """Owns the models and the run folder of one training run, and decides what happens when; its parts do the
    rest: `objective` (the nets and their step: objectives/), `inputs` (TrainingData: examples and conditions),
    `opt_g`/`opt_d` (NetOptimizer: the updates), `nonfinite` (NonFinitePolicy), `log` (RunLog: scalars and grids
    to the trackers). It is the `objectives.base.TrainingRun` the objective's step works with."""

    def __init__(self, cfg: TrainConfig, out: str | Path, resume: bool = False, progress: bool = True):
        from accelerate import Accelerator

        self.cfg = cfg
        self.out = Path(out)
        self.progress = progress
        self.objective = objectives.get(cfg.objective)
        tune_cpu(cfg.threads)  # threads, denormals and freed memory (cpu.py)
        if cfg.deterministic:
            use_deterministic_algorithms()
        # Data parallel when launched by accelerate/torchrun; precision is ours (precision.py: R1 needs the scale).
        self.accelerator = acc = Accelerator(cpu=launched_without_gpus())
        self.device = acc.device
        self.show_progress = progress and acc.is_main_process
        self.is_main = acc.is_main_process
        self.rank, self.world = acc.process_index, acc.num_processes
        precision.check_precision(cfg.mixed_precision, self.device)
        # Everything that can reject the config runs before the run folder is touched.
        self.schedule = diffusion.make_schedule(cfg.schedule, cfg.n_steps, cfg.beta_min, cfg.beta_max).to(self.device)
        if acc.is_main_process:  # refuse a bad --out before any slow setup (the main process
            prepare_run_dir(self.out, cfg, resume, write=False)  # alone: the others would see its config.json)
        self.inputs = TrainingData(cfg, acc, self.out, progress)  # the data, its caches and the conditions
        if self.inputs.cache is not None:  # settled with what the cache decides; nothing changes it after this
            cfg = with_cache(cfg, self.inputs.cache.meta)
        self.cfg = cfg
        embed_dim = self.inputs.embed_dim
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        gen, disc = build_nets(cfg, embed_dim)
        gen = gen.to(self.device, memory_format=memory_format)
        if disc is not None:
            disc = disc.to(self.device, memory_format=memory_format)
        resumed_changes: dict[str, tuple[Any, Any]] = {}  # optimisation settings changed on this --resume
        if acc.is_main_process:
            changed = prepare_run_dir(self.out, cfg, resume)
            resumed_changes = {k: v for k, v in changed.items() if k in NOTED_CHANGES}
            if resume:
                ckpt_io.clean_leftovers(self.out)
            self.inputs.write_stats()
        acc.wait_for_everyone()
        # The grids' fixed conditions, one per row: the grid prompts through the run's text prior (embedding runs),
        # else the kind's conditions of the grid requests (None: unconditional)
        self.grid_cond: Tensor | None = None
        self.kid: KidMonitor | None = None  # --kid_every: KID on the run's own features as it trains
        if self.inputs.pairs is not None:
            prior = self._text_prior()
            self.grid_cond = prior(self.inputs.grid_text, torch.Generator().manual_seed(0)).cpu()
            if cfg.kid_every and self.is_main:
                self.kid = KidMonitor(self.inputs.pairs, prior, lambda: load_embedder(cfg.encoder, self.device),
                                      cfg.kid_n, cfg.seed)
        torch.manual_seed(cfg.seed + 1000 * self.rank + 1)
        self.ema = copy.deepcopy(gen).requires_grad_(False).eval()
        self.opt_g = NetOptimizer(cfg, gen.parameters(), cfg.lr_gen, self.device)
        self.disc = self.opt_d = self.disc_frozen = None
        if disc is not None:
            self.opt_d = NetOptimizer(cfg, disc.parameters(), cfg.lr_disc, self.device)
            self.gen, self.disc, self.opt_g.opt, self.opt_d.opt = acc.prepare(gen, disc, self.opt_g.opt, self.opt_d.opt)
            # G's loss looks through D without training it: the plain module, outside data parallel's hooks.
            self.disc_frozen = disc
        else:
            self.gen, self.opt_g.opt = acc.prepare(gen, self.opt_g.opt)
        if cfg.compile:
            self._compile()
        self.step = 0
        self.base_step = self.base_position = 0  # P(s) = base_position + (s - base_step) · global batch
        self.nonfinite = NonFinitePolicy(cfg.skip_nonfinite)
        self.last_checkpoint: Path | None = None
        if resume:
            self._resume()
        self.log = RunLog(self.out, asdict(cfg), acc.is_main_process, cfg.tensorboard, cfg.wandb_project,
                          resume_step=self.step if resume else None, resumed_changes=resumed_changes)

    def _text_prior(self) -> TextPrior:
        """The run's text prior for its grids; a learned one (`--text_prior flow`) is trained first, by the main
        process into RUN/prior (resumed if it was interrupted), before the generator."""
        cfg = self.cfg
        if cfg.text_prior == "flow" and not prior_finished(self.out):
            if self.is_main:
                # the prior trains on the CPU: in bf16 where the run asks for it and the CPU computes it natively
                prior_bf16 = cfg.mixed_precision == "bf16" and native_bf16()
                prior_cfg = PriorTrainConfig(n_batches=cfg.prior_steps, seed=cfg.seed, threads=cfg.threads,
                                             data=cfg.data, mixed_precision="bf16" if prior_bf16 else "no")
                train_run_prior(self.out, self.inputs.pairs, prior_cfg, progress=self.progress)
            self.accelerator.wait_for_everyone()
        flow = load_flow_prior(self.out) if cfg.text_prior == "flow" else None
        return make_text_prior(PriorSettings.of(cfg), self.inputs.stats, flow, self.inputs.embed_dim, str(self.out))

    @property
    def global_batch(self) -> int:
        """Examples per optimizer step over all processes and micro-batches."""
        return self.cfg.batch_size * self.world * self.cfg.grad_accum

    def _compile(self) -> None:
        """torch.compile the generator, and the discriminator unless R1 needs its double backward (which
        torch.compile cannot differentiate)."""
        if not hasattr(torch, "compile"):
            raise UserError("--compile needs torch >= 2.0; drop --compile")
        self.gen = torch.compile(self.gen)
        if self.disc is not None and self.cfg.r1_gamma == 0:
            self.disc = torch.compile(self.disc)
            self.disc_frozen = torch.compile(self.disc_frozen)

    # ---- data -------------------------------------------------------------------------------------
    def position(self, step: int) -> int:
        """Global stream position of the first example of `step` (over all ranks and micro-batches)."""
        return self.base_position + (step - self.base_step) * self.global_batch

    def example_indices(self, step: int, micro: int = 0) -> list[int]:
        """The examples that micro-batch `micro` of this rank reads at `step`: a pure function of the step.

        The global positions of one step are split into consecutive slices, micro-batch-major then rank, so
        within an epoch of a finite dataset no example is read twice, by any rank."""
        b = self.cfg.batch_size
        start = self.position(step) + (micro * self.world + self.rank) * b
        return self.inputs.indices(range(start, start + b))

    def batch(self, step: int, micro: int = 0, drop: bool = True) -> tuple[Tensor, Tensor | None]:
        """The examples of this step, micro-batch and rank (`example_indices`) and their conditions."""
        return self.inputs.batch(self.example_indices(step, micro), drop)

    # ---- one optimisation step (the objective's; these are the parts it uses) -----------------------------
    def split_cond(self, cond: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """(generator's conditioning, discriminator's conditioning): None where a net does not see it."""
        return (cond if self.cfg.use_cloob_unet else None), (cond if self.cfg.use_cloob_disc else None)

    def autocast(self) -> contextlib.AbstractContextManager:
        return precision.autocast(self.cfg.mixed_precision, self.device)

    def sync_on_last(self, model: torch.nn.Module, i: int, k: int) -> contextlib.AbstractContextManager:
        """Gradient accumulation: ranks average gradients on the last micro-batch only."""
        return self.accelerator.no_sync(model) if i < k - 1 else contextlib.nullcontext()

    def update(self, part: NetOptimizer, model: torch.nn.Module, losses_finite: bool, name: str) -> float:
        """Clip and step, unless a loss or the gradient is not finite on any rank: then the non-finite policy
        stops the run or drops this update. Returns the gradient norm (before clipping)."""
        norm = part.clipped_norm(model, self.cfg.grad_clip)
        if self._on_any_rank(not part.finite(losses_finite, norm)):
            part.drop()
            self.nonfinite.bad(name, self.step + 1, self.last_checkpoint)
        else:
            part.step()
            self.nonfinite.good()
        return norm

    def _on_any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on one (ranks must take the same decisions)."""
        if self.world == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def _mean_over_ranks(self, logs: dict[str, float]) -> dict[str, float]:
        """The logged scalars averaged over ranks (each rank saw its own examples)."""
        if self.world == 1:
            return logs
        keys = sorted(logs)
        values = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(values)
        return dict(zip(keys, (values / self.world).tolist()))

    def train_step(self) -> dict[str, float]:
        """One optimisation step on this step's micro-batches, then the schedulers and the EMA update."""
        self.gen.train()
        micro = [self.batch(self.step, m) for m in range(self.cfg.grad_accum)]
        parts = {"g": self.opt_g} if self.opt_d is None else {"g": self.opt_g, "d": self.opt_d}
        lrs = {f"lr_{name}": part.lr for name, part in parts.items()}
        logs = self.objective.train_step(self, micro)
        for part in parts.values():
            part.schedule_step()
        ema_update(self.ema, self.accelerator.unwrap_model(self.gen), warmup_decay(self.cfg.ema_decay, self.step))
        self.step += 1
        return {**logs, **lrs}

    # ---- the loop ---------------------------------------------------------------------------------
    def run(self) -> Path:
        """Train until n_batches or the time budget (loop.TrainingLoop); returns the run folder."""
        self.run_loop()
        return self.out

    def time_is_up(self, deadline: float) -> bool:
        return self._on_any_rank(time.monotonic() > deadline)  # every rank stops at the same step

    def stop_requested(self, here: bool) -> bool:
        return self._on_any_rank(here)  # a signal to one process stops them all after the same step

    def at_deadline(self) -> None:
        """The time budget ends the run like its last step."""
        if self.log.pending:
            self._log_window()
        self.save()
        self.log_images()

    def after_step(self, logs: dict[str, float]) -> dict[str, str] | None:
        cfg, last = self.cfg, self.step == self.cfg.n_batches
        self.log.add(logs, self.global_batch)
        postfix = None
        if self.step % cfg.log_every == 0 or last:
            logged = self._log_window()
            postfix = {k: f"{v:.3g}" for k, v in logged.items() if k in self.objective.shown}
        # The checkpoint first: on a nearly full disk it matters more than the grid.
        if self.step % cfg.save_models_every == 0 or last:
            self.save()
        if self.step % cfg.log_images_every == 0 or last:
            self.log_images()
        if self.kid is not None and (self.step % cfg.kid_every == 0 or last):
            self._log_kid()
        return postfix

    def _log_kid(self) -> None:
        """KID of the EMA generator on the run's own features (training/kid_monitor.py), with its cost."""
        start = time.perf_counter()
        found = self.kid(self.ema, self.cfg, self.device, self.inputs.space)
        found["kid_seconds"] = time.perf_counter() - start
        try:
            self.log.scalars(found, step=self.step)
        except OSError as exc:
            raise TrainingError(self._write_failed(f"the KID of step {self.step} in {self.out}", exc)) from None

    def end_of_loop(self) -> None:
        self.log.close(self.step)

    def close(self) -> None:
        """Finish the run: close the trackers and, with several processes, free the data-parallel wrappers and
        then the process group (in that order: gloo aborted at exit without it, and hung when a wrapper
        outlived the group). The trainer cannot train after this."""
        self.log.close(self.step)
        if self.world > 1 and torch.distributed.is_initialized():
            import gc

            acc = self.accelerator
            self.gen = acc.unwrap_model(self.gen)
            self.disc = None if self.disc is None else acc.unwrap_model(self.disc)
            acc.free_memory()  # accelerate's own references to the wrappers
            gc.collect()
            torch.distributed.destroy_process_group()

    def take_step(self) -> dict[str, float]:
        """train_step, with running out of memory (and a failing torch.compile) turned into what to change."""
        try:
            return self.train_step()
        except TrainingError:
            raise
        except RuntimeError as exc:
            if is_out_of_memory(exc):
                raise TrainingError(self._oom_message()) from None
            if self.cfg.compile and type(exc).__module__.startswith("torch._"):
                first = first_line(exc)
                raise UserError(f"--compile: torch.compile failed on this platform ({first[:200]}); "
                                "drop --compile") from exc
            raise

    def _write_failed(self, what: str, exc: OSError) -> str:
        """A write into the run folder failed (a full disk): one line, with the last good checkpoint named."""
        kept = (f"the last good checkpoint {self.last_checkpoint} is intact" if self.last_checkpoint
                else "no checkpoint was written yet")
        return f"could not write {what} ({exc.strerror or exc}); {kept}. Free some space, then --resume"

    def _oom_message(self) -> str:
        cfg = self.cfg
        size = f"{cfg.img_size}px" + (f" (latent {cfg.latent_size}x{cfg.latent_size})" if cfg.latent_factor > 1 else "")
        where = f"; the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else ""
        half = "" if cfg.mixed_precision != "no" else ", --mixed_precision bf16 (fp16 on GPUs without bf16)"
        return (f"out of memory at step {self.step + 1} on {self.device} with --batch_size {cfg.batch_size} per "
                f"process at {size}: lower --batch_size (--grad_accum N keeps the global batch){half}, or use "
                f"narrower nets (--n_channels_unet, --n_channels_disc){where}")

    # ---- logging, grids, checkpoints ---------------------------------------------------------------
    def _log_window(self) -> dict[str, float]:
        """Log each scalar's mean over the steps since the last record (R1's over the lazy steps among them),
        averaged over ranks, with the global samples/s; returns what was logged."""
        logs = self._mean_over_ranks(self.log.window_means())
        extra = {"rss_mb": resident_mb()}
        if self.nonfinite.skipped:
            extra["skipped_updates"] = self.nonfinite.skipped
        if torch.cuda.is_available() and self.device.type == "cuda":
            extra["gpu_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            self.log.scalars({**logs, **extra}, step=self.step)
        except OSError as exc:
            raise TrainingError(self._write_failed(f"the log of step {self.step} in {self.out}", exc)) from None
        return logs

    @torch.no_grad()
    def log_images(self, rows: int = 6, cols: int = 6) -> None:
        """A grid from the EMA generator (fixed noise, fixed conditioning) and a reconstruction grid."""
        if not self.accelerator.is_main_process:
            return
        grid_cond = self.grid_cond
        if grid_cond is None:
            grid_cond = conditioning.get(self.cfg.cond).request_conditions(grid_requests(rows))
        cond = grid_cond if self.cfg.use_cloob_unet else None
        if cond is not None:
            cond = cond.to(self.device).repeat_interleave(cols, dim=0)
        rng = torch.Generator(device=self.device).manual_seed(1234)
        images = sample(self.ema, self.cfg, rows * cols, cond=cond, rng=rng, device=self.device,
                        space=self.inputs.space)
        grids = {"samples": make_grid(images.cpu(), nrow=cols)}
        if self.objective.predicts_x0:
            grids["reconstruction"] = self.reconstruction_grid()
        folder = self.out / "samples"
        try:
            folder.mkdir(exist_ok=True)
            for name, grid in grids.items():
                prefix = "step" if name == "samples" else "recon"
                save_image_atomic(grid, folder / f"{prefix}_{self.step:07d}.png")
            self.log.images(grids, step=self.step)
        except OSError as exc:
            raise TrainingError(self._write_failed(f"the sample grids of step {self.step} in {folder}", exc)) from None

    @torch.no_grad()
    def reconstruction_grid(self, n: int = 6) -> Any:
        """Rows: real x_0, then for t = T..1 the noised x_t and the EMA generator's x̂_0 (as the seed logged)."""
        x0, cond = self.batch(0, drop=False)
        n = min(n, x0.shape[0])
        x0, cond = x0[:n], None if cond is None else cond[:n]
        cond = self.split_cond(cond)[0]
        rows = [x0]
        gen = torch.Generator(device=self.device).manual_seed(99)
        for step in range(self.cfg.n_steps, 0, -1):
            t = torch.full((n,), step, dtype=torch.long, device=self.device)
            noise = torch.randn(x0.shape, generator=gen, device=self.device)
            x_t = diffusion.q_sample(self.schedule, x0, t, noise=noise)
            z_dim = self.objective.z_dim(self.cfg)
            z = torch.randn(n, z_dim, generator=gen, device=self.device) if z_dim else None
            rows += [x_t, self.ema(x_t, t, cond, z)]
        return make_grid(self.to_pixels(torch.cat(rows)).cpu(), nrow=n)

    def to_pixels(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] from model outputs: decoded by the autoencoder in latent runs."""
        return x.clamp(-1, 1) if self.inputs.space is None else self.inputs.space.decode(x)

    def save(self) -> None:
        """A checkpoint of everything a bit-identical resume needs, written by the main process with every
        rank's RNG states (once per step). A failed write (a full disk) leaves the previous checkpoint as it was and stops."""
        from accelerate.utils import broadcast_object_list, gather_object

        if self.last_checkpoint is not None and self.last_checkpoint.name == ckpt_io.checkpoint_name(self.step):
            return

        acc = self.accelerator
        rng = gather_object([ckpt_io.capture_rng()])  # every rank's, in rank order
        result: list[Any] = [None, None]  # (checkpoint written, error)
        if acc.is_main_process:
            models = {"generator": acc.unwrap_model(self.gen), "generator_ema": self.ema}
            state: dict[str, Any] = {
                "step": self.step, "position": self.position(self.step), "world_size": self.world,
                "grad_accum": self.cfg.grad_accum, "skipped": self.nonfinite.skipped, "rng": rng,
                **self.opt_g.state_dict("g")}
            if self.disc is not None:
                models["discriminator"] = acc.unwrap_model(self.disc)
                state.update(self.opt_d.state_dict("d"))
            try:
                result[0] = ckpt_io.save_checkpoint(self.out, self.step, models, state, self.cfg)
            except OSError as exc:
                result[1] = self._write_failed(f"the checkpoint of step {self.step} in {self.out / 'checkpoints'}", exc)
        if self.world > 1:
            broadcast_object_list(result)
        if result[1]:
            raise TrainingError(result[1])
        self.last_checkpoint = result[0]

    def _resume(self) -> None:
        """Load the newest intact checkpoint: a damaged latest one (a truncated file) is passed over with a
        one-line warning naming both; then the learning rates in effect are the config's (they may have changed)."""
        damaged: list[tuple[Path, str]] = []
        for folder in ckpt_io.checkpoints_newest_first(self.out):
            try:
                self._load(folder)
            except UserError as exc:
                damaged.append((folder, str(exc)))
                continue
            if damaged and self.rank == 0:
                names = ", ".join(d.name for d, _ in damaged)
                warnings.warn(f"checkpoint {names} is damaged ({damaged[0][1]}); resuming from {folder.name} "
                              f"(step {self.step}) instead", BadCheckpointWarning, stacklevel=2)
            break
        else:
            if damaged:
                raise UserError(f"no intact checkpoint in {self.out / 'checkpoints'} to resume from: "
                                f"{damaged[0][1]}")
        self._set_lrs()

    def _set_lrs(self) -> None:
        """The config's learning rates (they may have changed on this --resume) over the checkpoint's."""
        self.opt_g.set_lr(self.cfg.lr_gen)
        if self.opt_d is not None:
            self.opt_d.set_lr(self.cfg.lr_disc)

    def _load(self, folder: Path | None) -> None:
        if folder is None:
            return
        acc = self.accelerator
        state = ckpt_io.load_state(folder)
        acc.unwrap_model(self.gen).load_state_dict(load_model(UNet, folder / "generator").state_dict())
        self.ema.load_state_dict(load_model(UNet, folder / "generator_ema").state_dict())
        self.opt_g.load_state_dict(state, "g")
        if self.disc is not None:
            disc = load_model(Discriminator, folder / "discriminator")
            acc.unwrap_model(self.disc).load_state_dict(disc.state_dict())
            self.opt_d.load_state_dict(state, "d")
        self.step = int(state["step"])
        rng = state.get("rng") or [{"torch": state["torch_rng"]}]  # checkpoints before per-rank states
        if self.rank < len(rng):
            ckpt_io.restore_rng(rng[self.rank])
        else:  # more processes than the run had: a fresh stream for the new rank (the run is no longer exact)
            torch.manual_seed(self.cfg.seed + 1000 * self.rank + 1 + self.step)
        self.base_step = self.step
        self.base_position = int(state.get("position", self.step * self.cfg.batch_size * int(state.get("world_size", 1))))
        self.nonfinite.skipped = int(state.get("skipped", 0))
        self.last_checkpoint = folder


def launched_without_gpus() -> bool:
    """Several processes (torchrun / accelerate launch) on a machine without CUDA: accelerate runs them as
    CPU data parallel (gloo) only when told to use the CPU."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def use_deterministic_algorithms() -> None:
    """--deterministic: only kernels that give the same result on every run (CPU kernels already do)."""
    import os

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def is_out_of_memory(exc: BaseException) -> bool:
    """A GPU's OutOfMemoryError, or the CPU allocator refusing an allocation."""
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    text = str(exc)
    return isinstance(exc, oom) or "can't allocate memory" in text or "out of memory" in text.lower()


def resident_mb() -> float:
    """This process's resident memory in MiB (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        import os

        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, AttributeError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
