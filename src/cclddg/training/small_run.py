"""What `train-cloob`, `train-ae` and `train-prior` share beyond the loop and the run folder every trainer has (loop.TrainingLoop,
checkpoint.prepare_run_folder): log.jsonl, and checkpoints of the models, the optimizers and the RNG.

A subclass builds its models and data in `__init__` (after `super().__init__`), says which modules and optimizers
make up its state (`models`, `optimizers`), and gives `train_step() -> logs` and `evaluate() -> report`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, ClassVar

import torch

from cclddg import preemption
from cclddg.cpu import tune_cpu
from cclddg.data.sources import check_source
from cclddg.errors import UserError
from cclddg.run_folder import list_checkpoints, resolve_checkpoint
from cclddg.training import checkpoint as ckpt_io
from cclddg.training.loop import TrainingLoop

# Settings a resumed small run may change; everything else must match its config.json.
RESUMABLE = {"n_batches", "max_minutes", "log_every", "save_every", "eval_size", "threads", "workers"}


class SmallTrainer(TrainingLoop):
    COMMAND: ClassVar[str] = ""  # "train-cloob" / "train-ae": named in messages and the progress bar (DESC)
    POSTFIX: ClassVar[str] = "loss"  # the log value the progress bar shows
    LOG_DIGITS: ClassVar[int | None] = None  # round logged values to this many decimals (None: as they are)

    def __init__(self, cfg: Any, out: str | Path, resume: bool = False, progress: bool = True):
        cfg.validate()
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.show_progress = progress
        tune_cpu(cfg.threads)  # threads, denormals and freed memory (cpu.py)
        self.check_data()
        ckpt_io.prepare_run_folder(self.out, cfg, resume, RESUMABLE, self.COMMAND)
        torch.manual_seed(cfg.seed)
        self.step = 0
        self.last_checkpoint: Path | None = None

    # ---- what a subclass gives ---------------------------------------------------------------------
    def check_data(self) -> None:
        """Fail before the run folder is touched when the data cannot be read (a missing folder, ...)."""
        check_source(self.cfg.data, self.cfg.img_size)

    def models(self) -> dict[str, torch.nn.Module]:
        """The modules saved as config.json + safetensors folders (name -> module)."""
        raise NotImplementedError

    def optimizers(self) -> dict[str, Any]:
        """Everything else whose state_dict the checkpoint keeps (name -> object), e.g. optimizers."""
        raise NotImplementedError

    def load_models(self, folder: Path) -> None:
        """Load `models()` from a checkpoint folder."""
        raise NotImplementedError

    def train_step(self) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self) -> dict:
        raise NotImplementedError

    def optimise(self, loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        """One optimiser step on `loss`; a non-finite loss stops the run in one line (and says what to lower)."""
        if not torch.isfinite(loss):
            raise UserError(f"{self.COMMAND}: the loss became {loss.item()} at step {self.step}; lower --lr "
                            f"(last checkpoint: {self.last_checkpoint})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # ---- the loop (loop.TrainingLoop) -------------------------------------------------------------
    def run(self) -> dict:
        """Train until `n_batches` (or `max_minutes`), logging every `log_every` steps and saving every `save_every`
        and at the end (and on Ctrl-C); returns `evaluate()`."""
        self._t0, self._last = time.monotonic(), self.step
        with preemption.deferred():  # a stop signal during the last checkpoint waits for it
            self.run_loop()
            self.save()
        return self.evaluate()

    def after_step(self, logs: dict[str, float]) -> dict[str, str] | None:
        postfix = None
        if self.step % self.cfg.log_every == 0:
            elapsed = max(1e-9, time.monotonic() - self._t0)
            logs["samples_per_s"] = (self.step - self._last) * self.cfg.batch_size / elapsed
            self._t0, self._last = time.monotonic(), self.step
            postfix = {self.POSTFIX: f"{logs[self.POSTFIX]:.4g}"}
            self._log(logs)
        if self.step % self.cfg.save_every == 0:
            self.save()
        return postfix

    def _log(self, logs: dict[str, float]) -> None:
        values = logs if self.LOG_DIGITS is None else {k: round(v, self.LOG_DIGITS) for k, v in logs.items()}
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, **values}) + "\n")

    # ---- checkpoints -------------------------------------------------------------------------------
    def save(self) -> None:
        """A checkpoint of this step (once): the models, the optimizers' states, the step and the RNG."""
        if self.last_checkpoint is not None and self.last_checkpoint.name == ckpt_io.checkpoint_name(self.step):
            return
        state = {"step": self.step, "torch_rng": torch.get_rng_state(),
                 **{name: obj.state_dict() for name, obj in self.optimizers().items()}}
        self.last_checkpoint = ckpt_io.save_checkpoint(self.out, self.step, self.models(), state, self.cfg)

    def resume_from_latest(self) -> None:
        """Continue from the run's latest checkpoint, if it has one."""
        if not list_checkpoints(self.out):
            return
        folder = resolve_checkpoint(self.out)
        self.load_models(folder)
        state = ckpt_io.load_state(folder)
        for name, obj in self.optimizers().items():
            if name in state:
                obj.load_state_dict(state[name])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        self.last_checkpoint = folder
