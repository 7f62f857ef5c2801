"""`cclddg train-prior RUN`: the learned text prior (priors/flow.py) of an embedding run, on the run's own data.

It trains on the embeddings the run's cache already holds (no image is read, no embedder runs): each example's
image embedding, conditioned on its caption's text embedding (`--source captions`, DALL-E 2's prior), or on
LAFITE pseudo-text made from the image embedding itself (`--source pseudo-text`: no caption needed). A fixed
part (`eval_size` examples, at most a tenth; a seeded choice) is held out: the report gives its flow-matching loss beside the
training loss. `cclddg train` trains it first, before the generator, when the run's `--text_prior` is `flow`.

Run folder RUN/prior/: config.json, log.jsonl, checkpoints/step_*/prior/, and when it ends model/ (the prior,
config.json + safetensors: what sampling loads) and report.json.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cclddg.atomic import write_text_atomic
from cclddg.conditioning.embedding import pseudo_text
from cclddg.config import PriorTrainConfig
from cclddg.errors import UserError
from cclddg.priors import flow_prior_path
from cclddg.priors.flow import FlowPrior
from cclddg.priors.pairs import EmbeddingPairs
from cclddg.storage import load_model
from cclddg.training import precision
from cclddg.training.optimisation import warmup_cosine
from cclddg.training.small_run import SmallTrainer

MIN_PAIRS = 2  # a prior needs at least this many captioned examples to train on


class PriorTrainer(SmallTrainer):
    COMMAND = DESC = "train-prior"

    def __init__(self, cfg: PriorTrainConfig, out: str | Path, pairs: EmbeddingPairs, resume: bool = False,
                 progress: bool = True):
        super().__init__(cfg, out, resume, progress)
        rows = np.nonzero(pairs.captioned.numpy())[0] if cfg.source == "captions" else np.arange(len(pairs))
        if len(rows) < MIN_PAIRS:
            hint = ": use --source pseudo-text, which needs no captions" if cfg.source == "captions" else ""
            raise UserError(f"the run's data has {len(rows)} {'captioned ' if cfg.source == 'captions' else ''}"
                            f"examples, too few to train a prior on{hint}")
        held = min(cfg.eval_size, len(rows) // 10)  # at most a tenth of the pairs is held out
        rows = rows[np.random.default_rng([cfg.seed, 7]).permutation(len(rows))]
        self.pairs, self.held, self.rows = pairs, np.sort(rows[:held]), torch.from_numpy(rows[held:])
        width = cfg.width or max(64, 2 * pairs.dim)
        xi = cfg.text_noise if cfg.source == "captions" else cfg.pseudo_text_xi
        self.model = FlowPrior(dim=pairs.dim, width=width, depth=cfg.depth, cond_drop=cfg.cond_drop,
                               source=cfg.source, condition_noise=xi)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        if resume:
            self.resume_from_latest()

    def check_data(self) -> None:
        """The prior reads the embeddings it is given, not a data source."""

    # ---- training -----------------------------------------------------------------------------------
    def conditions(self, image_emb: Tensor, text_emb: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """What the prior is conditioned on: the captions' embeddings (perturbed by `text_noise`), or pseudo-text
        of the images' (`pseudo_text_xi`)."""
        if self.cfg.source == "captions":
            return pseudo_text(text_emb, self.cfg.text_noise, generator)
        return pseudo_text(image_emb, self.cfg.pseudo_text_xi, generator)

    def learning_rate(self) -> float:
        """Linear warmup, then a cosine decay to 0 over n_batches."""
        return warmup_cosine(self.cfg.lr, self.step, self.cfg.warmup, self.cfg.n_batches)

    def train_step(self) -> dict[str, float]:
        idx = self.rows[torch.randint(0, len(self.rows), (self.cfg.batch_size,))]
        for group in self.opt.param_groups:
            group["lr"] = self.learning_rate()
        image, text = self.pairs.get(idx)
        with precision.autocast(self.cfg.mixed_precision, torch.device("cpu")):
            loss = self.model.loss(image, self.conditions(image, text))
        self.optimise(loss, self.opt)
        self.step += 1
        return {"loss": loss.item()}

    @torch.no_grad()
    def held_out_loss(self, repeats: int = 4) -> float | None:
        """The flow-matching loss on the held-out examples (fixed noise), averaged over a few draws."""
        if len(self.held) == 0:
            return None
        self.model.eval()
        generator = torch.Generator().manual_seed(0)
        image, text = self.pairs.get(self.held)
        losses = [float(self.model.loss(image, self.conditions(image, text, generator), generator))
                  for _ in range(repeats)]
        self.model.train()
        return float(np.mean(losses))

    def evaluate(self) -> dict:
        """The report (report.json), after the final model is written to model/."""
        held_loss = self.held_out_loss()
        report = {"step": self.step, "held_out_loss": None if held_loss is None else round(held_loss, 5),
                  "pairs": len(self.rows),
                  "held_out": len(self.held), "source": self.cfg.source,
                  "parameters": sum(p.numel() for p in self.model.parameters())}
        self.write_model()
        write_text_atomic(self.out / "report.json", json.dumps(report, indent=2))
        return report

    def write_model(self) -> None:
        """The finished prior as out/model (written in a temporary folder and renamed)."""
        final = self.out / "model"
        tmp = Path(tempfile.mkdtemp(prefix=".model.tmp-", dir=self.out))
        try:
            self.model.eval().save_pretrained(tmp, safe_serialization=True)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    # ---- checkpoints --------------------------------------------------------------------------------
    def models(self) -> dict[str, torch.nn.Module]:
        return {"prior": self.model}

    def optimizers(self) -> dict:
        return {"optimizer": self.opt}

    def load_models(self, folder: Path) -> None:
        self.model.load_state_dict(load_model(FlowPrior, folder / "prior").state_dict())



def prior_finished(run: Path) -> bool:
    """Whether a run's learned prior (RUN/prior) has finished: its model/ is written last."""
    return (flow_prior_path(run) / "model" / "config.json").is_file()


def train_run_prior(run: Path, pairs: EmbeddingPairs, cfg: PriorTrainConfig, progress: bool = True) -> dict:
    """Train (or finish) a run's learned prior in RUN/prior; returns its report."""
    out = flow_prior_path(run)
    resume = (out / "config.json").is_file()
    if progress:
        print(f"{'resuming' if resume else 'training'} the run's learned prior ({cfg.source}, {cfg.n_batches} steps) "
              f"in {out}", flush=True)
    return PriorTrainer(cfg, out, pairs, resume=resume, progress=progress).run()
