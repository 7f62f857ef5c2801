"""Run by tests/test_distributed.py under torchrun (2 CPU processes, gloo): a tiny DDGAN on a folder of images,
stepped by hand; each rank records, after every optimizer step, a digest of its weights and the examples it
read, then `run()` logs and checkpoints a few more steps. argv: IMAGES_FOLDER OUT_FOLDER GRAD_ACCUM."""

from __future__ import annotations

import faulthandler
import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from cclddg.run_config import resolve
from cclddg.training.trainer import Trainer


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    faulthandler.dump_traceback_later(100, exit=True)  # a hang shows where each rank waits, then ends the test
    images, out, grad_accum = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    cfg = resolve("ddgan", dict(
        data=f"folder:{images}", cond="none", img_size=16, n_channels_unet=8, ch_mults=(1, 2), is_attn=(False, False),
        n_channels_disc=8, ch_mults_disc=(1, 2), is_attn_disc=(False, False), batch_size=2, grad_accum=grad_accum,
        z_dim=4, n_z_channels=8, lazy_reg=2, n_batches=100, log_every=1, log_images_every=100, save_models_every=100,
        cache_dir=str(out / "cache"), workers=0, tensorboard=False))
    trainer = Trainer(cfg, out / "run", progress=False)
    acc = trainer.accelerator
    steps = []
    per_epoch = cfg.data_size // trainer.global_batch
    for _ in range(2 * per_epoch):
        read = [trainer.example_indices(trainer.step, m) for m in range(cfg.grad_accum)]
        trainer.train_step()
        steps.append({"read": read, "gen": digest(acc.unwrap_model(trainer.gen)),
                      "disc": digest(acc.unwrap_model(trainer.disc)), "ema": digest(trainer.ema)})
    result = {"rank": acc.process_index, "world": acc.num_processes, "data_size": cfg.data_size,
              "global_batch": trainer.global_batch, "steps": steps}
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(result))
    trainer.cfg = replace(trainer.cfg, n_batches=trainer.step + 2)  # then the loop itself: logging, grids and a checkpoint
    trainer.run()
    trainer.close()


if __name__ == "__main__":
    main()
