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
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cclddg.atomic import write_text_atomic
from cclddg.config import CLOOBTrainConfig
from cclddg.data.images import uint8_to_unit
from cclddg.data.sources import (
    load_held_out,
    load_training_set,
    parse_data_spec,
)
from cclddg.encoders.own_cloob import CLOOBModel, OwnCLOOB
from cclddg.encoders.sentence import SENTENCE_DIM
from cclddg.errors import UserError
from cclddg.evaluation.emoji_paraphrases import EMOJI_PARAPHRASES
from cclddg.evaluation.retrieval import paraphrase_retrieval, retrieval_report
from cclddg.evaluation.zero_shot import zero_shot_report
from cclddg.storage import load_model, save_tensors_atomic
from cclddg.training.small_run import SmallTrainer


def embedding_dim(cfg: CLOOBTrainConfig) -> int:
    """--dim, or its default: the sentence encoder's width for a locked text head (its space is the joint one)."""
    if cfg.dim:
        return cfg.dim
    return SENTENCE_DIM if cfg.text_head == "locked" else 256


class CLOOBTrainer(SmallTrainer):
    COMMAND = DESC = "train-cloob"

    def __init__(self, cfg: CLOOBTrainConfig, out: str | Path, resume: bool = False, progress: bool = True):
        super().__init__(cfg, out, resume, progress)
        self.model = CLOOBModel(dim=embedding_dim(cfg), image_size=cfg.img_size, widths=cfg.widths,
                                text_tower=cfg.text_tower, text_head=cfg.text_head, text_hidden=cfg.text_hidden,
                                inv_tau=cfg.inv_tau, scale_hopfield=cfg.scale_hopfield)
        self.embedder = OwnCLOOB(self.model)  # holds the frozen text encoder / tokenizer
        self.model.train().requires_grad_(True)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        if resume:
            self.resume_from_latest()
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

    def train_step(self) -> dict[str, float]:
        idx = self.batch_indices(self.step)
        images = uint8_to_unit(self.images[idx])
        lr = self.cfg.lr * min(1.0, (self.step + 1) / max(1, self.cfg.warmup))
        for group in self.opt.param_groups:
            group["lr"] = lr
        loss = self.model.loss(self.model.image_features(images), self.model.text_head(self.text_inputs[idx]))
        self.optimise(loss, self.opt)
        self.step += 1
        return {"loss": loss.item()}

    def evaluate(self) -> dict:
        self.model.eval()
        if parse_data_spec(self.cfg.data).procedural:
            report = {"step": self.step, **zero_shot_report(self.embedder, self.cfg.eval_size, self.cfg.img_size)}
        else:  # real data: does each held-out image find its own caption?

            images, captions = load_held_out(self.cfg.data, self.cfg.img_size, self.cfg.eval_size, 0,
                                             workers=self.cfg.workers)

            images = uint8_to_unit(images)
            report = {"step": self.step, **retrieval_report(self.embedder, images, captions)}
            if self.cfg.data.split(":")[0] == "emoji":
                report["paraphrase_retrieval"] = paraphrase_retrieval(self.embedder, images, captions, EMOJI_PARAPHRASES)
        self.model.train()
        write_text_atomic(self.out / "zero_shot.json", json.dumps(report, indent=2))
        return report

    # ---- checkpoints --------------------------------------------------------------------------------
    def models(self) -> dict[str, torch.nn.Module]:
        return {"cloob": self.model}

    def optimizers(self) -> dict:
        return {"optimizer": self.opt}

    def load_models(self, folder: Path) -> None:
        self.model.load_state_dict(load_model(CLOOBModel, folder / "cloob").state_dict())
