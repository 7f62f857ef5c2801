"""A new objective and a new conditioning kind are one module each plus a registration: toy ones, defined here and
registered from outside the package, train, sample, export and load through every front door unchanged (the worked
examples of docs/ARCHITECTURE.md)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from cclddg import CCLDDGPipeline, conditioning, diffusion, objectives
from cclddg.cli import main
from cclddg.conditioning.base import ConditionKind
from cclddg.conditioning.labels import label_condition
from cclddg.data.shapes import COLORS
from cclddg.errors import UserError
from cclddg.models.from_config import generator_from_config
from cclddg.objectives.base import StepLogs, sample_steps
from cclddg.objectives.ddgan import DDGAN
from cclddg.pipeline import load_generator
from tiny import GEN, with_flags

COLOUR_SLOTS = len(COLORS) + 1  # the shapes label vector's colour block: one slot per colour and "unnamed"


class ColourOnly(ConditionKind):
    """A toy kind: conditioned on the colour block of the shapes label vector alone."""

    name = "colour"
    described = "conditioned on a colour"
    asks = ("attrs",)
    uses_labels = True

    def width(self, embed_dim: int) -> int:
        return COLOUR_SLOTS

    def training_condition(self, labels, embeddings, cfg, random=True):
        return labels[:, :COLOUR_SLOTS]

    def request_conditions(self, requests):
        return label_condition([{"color": r["color"]} if "color" in r else {} for r in requests])[:, :COLOUR_SLOTS]


class X0Regression(DDGAN):
    """A toy objective: one network regressing x_0 from x_t (no discriminator, no z), sampled as a DDGAN is."""

    name = "x0"
    takes_z = False
    shown = ("loss",)

    def build(self, cfg, cond_dim, cond_scale):
        return generator_from_config(cfg, cond_dim if cfg.use_cloob_unet else 0, cond_scale, 0), None

    def train_step(self, run, micro):
        k, logs = len(micro), StepLogs()
        for i, (x0, cond) in enumerate(micro):
            with run.sync_on_last(run.gen, i, k), run.autocast():
                t = sample_steps(x0.shape[0], run.cfg.n_steps, x0.device)
                x_t = diffusion.q_sample(run.schedule, x0, t)
                loss = F.mse_loss(run.gen(x_t, t, run.split_cond(cond)[0]).float(), x0)
            run.opt_g.backward(loss, k)
            logs.add({"loss": loss.item()})
        return {**logs.means(), "grad_norm_g": run.update(run.opt_g, run.gen, logs.finite(["loss"]), "the model")}


@pytest.fixture
def registered():
    conditioning.register(ColourOnly())
    objectives.register(X0Regression())
    yield
    conditioning.KINDS.unregister("colour")
    objectives.OBJECTIVES.unregister("x0")


def test_a_registered_kind_and_objective_train_sample_and_export(registered, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *with_flags(GEN, "--cond", "colour", "--objective", "x0",
                                                          "--log_every", "1")]) == 0
    assert not (run / "checkpoints" / "latest").resolve().joinpath("discriminator").exists()
    assert {"loss", "grad_norm_g"} <= set(json.loads((run / "log.jsonl").read_text().splitlines()[-1]))
    model, cfg = load_generator(run)
    assert (model.config.cond_dim, model.config.z_dim, cfg.cond, cfg.objective) == (COLOUR_SLOTS, 0, "colour", "x0")

    # the command line asks the kind what a request may carry, and the condition reaches the net
    red, blue = tmp_path / "red.png", tmp_path / "blue.png"
    for colour, out in (("red", red), ("blue", blue)):
        assert main(["sample", "--checkpoint", str(run), "--attrs", f"color={colour}", "--cfg", "3", "--n", "2",
                     "-o", str(out), "--no_progress"]) == 0
    assert red.read_bytes() != blue.read_bytes()
    assert main(["sample", "--checkpoint", str(run), "--prompt", "a red circle", "-o", str(tmp_path / "p.png")]) == 2

    # the exported folder: checked, loaded and sampled through CCLDDGPipeline and the objective's scheduler step
    assert main(["export", str(run), str(tmp_path / "model")]) == 0
    pipe = CCLDDGPipeline.from_pretrained(tmp_path / "model")
    images = pipe(attrs="color=red", num_images_per_prompt=2, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    with pytest.raises(UserError, match="a prompt is not for it; give attrs="):
        pipe(prompt="a red circle")
    assert pipe.scheduler.timesteps.tolist() == [4, 3, 2, 1]


def test_an_unregistered_name_is_one_line_naming_the_known_ones():
    with pytest.raises(UserError, match="--cond 'colour' is not valid; choose one of labels, embedding, none"):
        conditioning.get("colour")
    with pytest.raises(UserError, match="--objective 'x0' is not valid; choose one of ddgan, diffusion"):
        objectives.get("x0")
