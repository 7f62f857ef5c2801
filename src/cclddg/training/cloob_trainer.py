"""`cclddg train-cloob`: train our own CLOOB (image tower + text tower) on a captioned data source.

The training set is finite (`train_size` examples); its images and the frozen text tower's features of
its captions are computed once at the start (features cached in the run folder), so a step is only the
two small trainable towers. Batches come from a per-epoch permutation seeded by (seed, epoch): a
resumed run sees exactly the batches it would have seen.

Run folder: config.json, log.jsonl, text_features.safetensors (cache), checkpoints/step_*/cloob/,
zero_shot.json (held-out zero-shot accuracy, written at the end).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cclddg.atomic import write_text_atomic
from cclddg.config import CLOOBTrainConfig
from cclddg.data.sources import (
    check_source,
    load_held_out,
    load_training_set,
    parse_data_spec,
)
from cclddg.encoders.own_cloob import CLOOBModel, OwnCLOOB
from cclddg.encoders.sentence import SENTENCE_DIM
from cclddg.errors import UserError
from cclddg.storage import load_model, save_tensors_atomic
from cclddg.training import checkpoint as ckpt_io


def embedding_dim(cfg: CLOOBTrainConfig) -> int:
    """--dim, or its default: the sentence encoder's width for a locked text head (its space is the joint one)."""
    if cfg.dim:
        return cfg.dim
    return SENTENCE_DIM if cfg.text_head == "locked" else 256


RESUMABLE = {"n_batches", "max_minutes", "log_every", "save_every", "eval_size", "threads", "workers"}


class CLOOBTrainer:
    def __init__(self, cfg: CLOOBTrainConfig, out: str | Path, resume: bool = False, progress: bool = True):
        cfg.validate()
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.set_flush_denormal(True)
        check_source(cfg.data, cfg.img_size)
        ckpt_io.prepare_small_run(self.out, cfg, resume, RESUMABLE, "train-cloob")
        torch.manual_seed(cfg.seed)
        self.model = CLOOBModel(dim=embedding_dim(cfg), image_size=cfg.img_size, widths=cfg.widths,
                                text_tower=cfg.text_tower, text_head=cfg.text_head, text_hidden=cfg.text_hidden,
                                inv_tau=cfg.inv_tau, scale_hopfield=cfg.scale_hopfield)
        self.embedder = OwnCLOOB(self.model)  # holds the frozen text encoder / tokenizer
        self.model.train().requires_grad_(True)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step = 0
        self.last_checkpoint: Path | None = None
        if resume and ckpt_io.list_checkpoints(self.out):
            self._load(ckpt_io.resolve_checkpoint(self.out))
        self.images, self.text_inputs = self._load_data()
        if cfg.center_text and self.step == 0:  # fixed before the first step; a resumed run loads it
            with torch.no_grad():
                self.model.text_center.copy_(self.text_inputs.mean(0))

    # ---- setup --------------------------------------------------------------------------------------
    def _load_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All training images (uint8) and the text head's inputs for all captions, computed once."""
        cfg = self.cfg
        images, captions = load_training_set(cfg.data, cfg.img_size, cfg.seed, cfg.train_size, cfg.eval_size,
                                             workers=cfg.workers, progress=self.progress)
        if len(images) < cfg.batch_size:
            raise UserError(f"--data {cfg.data} gave {len(images)} training images (after {cfg.eval_size} held out), "
                            f"fewer than --batch_size {cfg.batch_size}; lower --batch_size or --eval_size")
        cache = self.out / "text_inputs.safetensors"
        if cache.is_file():
            from safetensors.torch import load_file

            text = load_file(str(cache))["text"]
        else:
            unique = sorted(set(captions))
            index = {c: i for i, c in enumerate(unique)}
            feats = []
            for start in tqdm(range(0, len(unique), 512), desc="text features", disable=not self.progress):
                feats.append(self.embedder.text_inputs(unique[start:start + 512]).cpu())
            text = torch.cat(feats)[torch.tensor([index[c] for c in captions])]
            save_tensors_atomic(cache, {"text": text.contiguous()})
        return images, text

    # ---- training -----------------------------------------------------------------------------------
    def batch_indices(self, step: int) -> torch.Tensor:
        """Examples of `step`: a slice of the permutation of its epoch (a pure function of the step)."""
        n = len(self.images)
        per_epoch = n // self.cfg.batch_size
        epoch, k = divmod(step, per_epoch)
        perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(n)
        b = self.cfg.batch_size
        return torch.from_numpy(perm[k * b:(k + 1) * b])

    def train_step(self) -> float:
        idx = self.batch_indices(self.step)
        images = self.images[idx].float() / 127.5 - 1
        lr = self.cfg.lr * min(1.0, (self.step + 1) / max(1, self.cfg.warmup))
        for group in self.opt.param_groups:
            group["lr"] = lr
        loss = self.model.loss(self.model.image_features(images), self.model.text_head(self.text_inputs[idx]))
        if not torch.isfinite(loss):
            raise UserError(f"train-cloob: the loss became {loss.item()} at step {self.step}; lower --lr "
                            f"(last checkpoint: {self.last_checkpoint})")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step += 1
        return loss.item()

    def run(self) -> dict:
        cfg = self.cfg
        deadline = time.monotonic() + cfg.max_minutes * 60 if cfg.max_minutes else math.inf
        total = cfg.n_batches
        bar = tqdm(total=total, initial=self.step, desc="train-cloob", disable=not self.progress)
        t0, last = time.monotonic(), self.step
        try:
            while self.step < total and time.monotonic() < deadline:
                loss = self.train_step()
                bar.update(1)
                if self.step % cfg.log_every == 0:
                    rate = (self.step - last) * cfg.batch_size / max(1e-9, time.monotonic() - t0)
                    t0, last = time.monotonic(), self.step
                    bar.set_postfix(loss=f"{loss:.3f}")
                    with open(self.out / "log.jsonl", "a") as f:
                        f.write(json.dumps({"step": self.step, "loss": loss, "samples_per_s": rate}) + "\n")
                if self.step % cfg.save_every == 0:
                    self.save()
        except KeyboardInterrupt:
            self.save()
            raise
        finally:
            bar.close()
        self.save()
        return self.evaluate()

    def evaluate(self) -> dict:
        from cclddg.evaluation.zero_shot import zero_shot_report

        self.model.eval()
        if parse_data_spec(self.cfg.data).procedural:
            report = {"step": self.step, **zero_shot_report(self.embedder, self.cfg.eval_size, self.cfg.img_size)}
        else:  # real data: does each held-out image find its own caption?
            from cclddg.evaluation.retrieval import retrieval_report

            images, captions = load_held_out(self.cfg.data, self.cfg.img_size, self.cfg.eval_size, 0,
                                             workers=self.cfg.workers)
            from cclddg.evaluation.emoji_paraphrases import EMOJI_PARAPHRASES
            from cclddg.evaluation.retrieval import paraphrase_retrieval

            images = images.float() / 127.5 - 1
            report = {"step": self.step, **retrieval_report(self.embedder, images, captions)}
            if self.cfg.data.split(":")[0] == "emoji":
                report["paraphrase_retrieval"] = paraphrase_retrieval(self.embedder, images, captions, EMOJI_PARAPHRASES)
        self.model.train()
        write_text_atomic(self.out / "zero_shot.json", json.dumps(report, indent=2))
        return report

    # ---- checkpoints --------------------------------------------------------------------------------
    def save(self) -> None:
        if self.last_checkpoint is not None and self.last_checkpoint.name == ckpt_io.checkpoint_name(self.step):
            return
        state = {"step": self.step, "optimizer": self.opt.state_dict(), "torch_rng": torch.get_rng_state()}
        self.last_checkpoint = ckpt_io.save_checkpoint(self.out, self.step, {"cloob": self.model}, state, self.cfg)

    def _load(self, folder: Path) -> None:
        model = load_model(CLOOBModel, folder / "cloob")
        self.model.load_state_dict(model.state_dict())
        state = ckpt_io.load_state(folder)
        self.opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        self.last_checkpoint = folder

