"""`cclddg train-ae`: train a small KL autoencoder (diffusers `AutoencoderKL`) on a data source.

Loss: L1 + `mse_weight`·MSE + `kl_weight`·KL, and optionally a patch-adversarial hinge term
(`adv_weight`, from step `adv_start`). Reconstructions come from the posterior mean unless
`sample_posterior`: sampling with the untrained posterior variance (std ~1 at init) drowns the latents
and made learning several times slower on shapes (measured); the KL term still keeps the latents small.
The net is fully convolutional, so it trains on random `crop`-sized crops (aligned to the downsampling
factor): several times cheaper per step than full images, with the same local statistics.

Run folder: config.json, log.jsonl, checkpoints/step_*/autoencoder/ (+ discriminator/),
report.json (held-out PSNR and the latent scale factor measured on the training data, at the end).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cclddg.atomic import write_text_atomic
from cclddg.config import AETrainConfig
from cclddg.data.images import uint8_to_unit
from cclddg.data.sources import load_held_out, load_training_set
from cclddg.latents.base import measure_scale
from cclddg.latents.own_ae import build_autoencoder
from cclddg.latents.vae import DiffusersVAE
from cclddg.storage import load_model
from cclddg.training.optimisation import warmup_cosine
from cclddg.training.small_run import SmallTrainer

HELD_OUT_SEED = 1_000_003  # the held-out images of every report (as in evaluation.zero_shot)


class PatchDiscriminator(nn.Module):
    """A small PatchGAN: one real/fake logit per receptive field, for the optional adversarial term."""

    def __init__(self, width: int = 32, levels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = 3
        for i in range(levels):
            out = width * 2 ** i
            layers += [nn.Conv2d(ch, out, 4, stride=2 if i < levels - 1 else 1, padding=1), nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def psnr(a: Tensor, b: Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), over the whole batch."""
    mse = float(((a.clamp(-1, 1) - b) / 2).pow(2).mean())
    return 10 * math.log10(1 / max(mse, 1e-12))


class AETrainer(SmallTrainer):
    COMMAND = DESC = "train-ae"
    POSTFIX = "l1"
    LOG_DIGITS = 6

    def __init__(self, cfg: AETrainConfig, out: str | Path, resume: bool = False, progress: bool = True):
        super().__init__(cfg, out, resume, progress)
        self.ae = build_autoencoder(cfg.widths, cfg.latent_channels, cfg.layers_per_block, cfg.norm_groups)
        self.opt = torch.optim.Adam(self.ae.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
        self.disc = self.opt_d = None
        if cfg.adv_weight > 0:
            self.disc = PatchDiscriminator()
            self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
        if resume:
            self.resume_from_latest()
        self.images = load_training_set(cfg.data, cfg.img_size, cfg.seed, cfg.train_size, cfg.eval_size,
                                        workers=cfg.workers, progress=progress)[0]

    # ---- training -----------------------------------------------------------------------------------
    def batch(self, step: int) -> Tensor:
        """The crops of `step`: a pure function of (seed, step), so a resumed run sees the same data."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, step])
        idx = torch.from_numpy(rng.integers(0, len(self.images), cfg.batch_size))
        x = uint8_to_unit(self.images[idx])
        if cfg.crop and cfg.crop < cfg.img_size:
            top, left = (rng.integers(0, (cfg.img_size - cfg.crop) // cfg.factor + 1, 2) * cfg.factor).tolist()
            x = x[:, :, top:top + cfg.crop, left:left + cfg.crop]
        return x

    def learning_rate(self, step: int) -> float:
        """Linear warm-up, then a cosine decay to 5% at `n_batches` (the last steps polish the edges: +2-3 dB)."""
        return warmup_cosine(self.cfg.lr, step, self.cfg.warmup, self.cfg.n_batches, floor=0.05)

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        x = self.batch(self.step)
        for group in self.opt.param_groups:
            group["lr"] = self.learning_rate(self.step)
        posterior = self.ae.encode(x).latent_dist
        rec = self.ae.decode(posterior.sample() if cfg.sample_posterior else posterior.mode()).sample
        l1, mse, kl = (rec - x).abs().mean(), (rec - x).pow(2).mean(), posterior.kl().mean()
        loss = l1 + cfg.mse_weight * mse + cfg.kl_weight * kl
        logs = {"l1": l1.item(), "mse": mse.item(), "kl": kl.item()}
        adversarial = self.disc is not None and self.step >= cfg.adv_start
        if adversarial:
            self.disc.requires_grad_(False)
            loss_g = -self.disc(rec).mean()
            loss = loss + cfg.adv_weight * loss_g
            logs["loss_g"] = loss_g.item()
        self.optimise(loss, self.opt)
        if adversarial:
            self.disc.requires_grad_(True)
            loss_d = F.relu(1 - self.disc(x)).mean() + F.relu(1 + self.disc(rec.detach())).mean()
            self.opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            self.opt_d.step()
            logs["loss_d"] = loss_d.item()
        self.step += 1
        logs["loss"] = loss.item()
        return logs

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out reconstruction PSNR (posterior mean) and the scale factor of the training latents."""
        space = DiffusersVAE(self.ae)
        held_out = uint8_to_unit(load_held_out(self.cfg.data, self.cfg.img_size, self.cfg.eval_size, HELD_OUT_SEED,
                                               workers=self.cfg.workers)[0])
        rec = space.decode(space.encode(held_out))
        report = {"step": self.step, "psnr_held_out": round(psnr(rec, held_out), 3),
                  "l1_held_out": round(float((rec - held_out).abs().mean()), 5),
                  "scale": measure_scale(space, uint8_to_unit(self.images[:512])),
                  "factor": self.cfg.factor, "latent_channels": self.cfg.latent_channels}
        self.ae.train().requires_grad_(True)
        write_text_atomic(self.out / "report.json", json.dumps(report, indent=2))
        return report

    # ---- checkpoints --------------------------------------------------------------------------------
    def models(self) -> dict[str, nn.Module]:
        return {"autoencoder": self.ae}

    def optimizers(self) -> dict:
        """The patch discriminator is kept in the training state (it is not part of the autoencoder)."""
        extra = {} if self.disc is None else {"discriminator": self.disc, "optimizer_d": self.opt_d}
        return {"optimizer": self.opt, **extra}

    def load_models(self, folder: Path) -> None:
        from diffusers import AutoencoderKL

        self.ae.load_state_dict(load_model(AutoencoderKL, folder / "autoencoder").state_dict())
