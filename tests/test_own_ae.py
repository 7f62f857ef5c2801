"""`cclddg train-ae`: the own KL autoencoder learns, resumes exactly, loads as a latent space, refuses bad input."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL

from cclddg.cli import main
from cclddg.config import AETrainConfig
from cclddg.errors import UserError
from cclddg.latents import load_latent_space
from cclddg.latents.own_ae import find_model_folder
from cclddg.training.ae_trainer import AETrainer
from tiny import AE, with_flags

TINY_AE = with_flags(AE, "--crop", "8", "--train_size", "256", "--batch_size", "16", "--eval_size", "32",
                     "--log_every", "10", "--save_every", "40", "--warmup", "5", drop=("--latent_channels", "--n_batches"))


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ae") / "ae"
    assert main(["train-ae", "--out", str(out), "--n_batches", "120", "--lr", "3e-3", *TINY_AE]) == 0
    return out


def test_train_ae_learns_and_reports(ae_run):
    log = [json.loads(line) for line in (ae_run / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 120 and log[-1]["l1"] < 0.5 * log[0]["l1"]
    report = json.loads((ae_run / "report.json").read_text())
    assert report["step"] == 120 and report["factor"] == 2 and report["latent_channels"] == 4
    assert report["psnr_held_out"] > 12  # untrained: 8.4 dB; all-grey images: 9.2 dB
    assert 0.05 < report["scale"] < 20


def test_own_ae_is_a_latent_space(ae_run):
    space = load_latent_space(f"own:{ae_run}", scale=0.5)
    assert (space.channels, space.factor) == (4, 2) and space.latent_shape(16) == (4, 8, 8)
    model = AutoencoderKL.from_pretrained(find_model_folder(ae_run), use_safetensors=True).eval()
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mean = model.encode(images).latent_dist.mode()
        torch.testing.assert_close(space.encode(images), 0.5 * mean)
        torch.testing.assert_close(space.decode(space.encode(images)), model.decode(mean).sample.clamp(-1, 1))
    assert space.fingerprint and space.spec == f"own:{ae_run}"


def test_train_ae_resume_is_exact(tmp_path):
    """Stopped after 7 of 12 steps and resumed == 12 straight steps (same data, LR schedule, RNG)."""
    from safetensors.torch import load_file

    def weights(run):
        name = (run / "checkpoints" / "latest").read_text()
        return load_file(run / "checkpoints" / name / "autoencoder" / "diffusion_pytorch_model.safetensors")

    cfg = AETrainConfig(img_size=16, widths=(8, 16), norm_groups=4, crop=8, train_size=64, batch_size=8,
                        eval_size=8, n_batches=12, warmup=5, save_every=100)
    straight, split = tmp_path / "straight", tmp_path / "split"
    AETrainer(cfg, straight, progress=False).run()
    first = AETrainer(cfg, split, progress=False)
    for _ in range(7):
        first.train_step()
    first.save()  # what Ctrl-C does
    AETrainer(cfg, split, resume=True, progress=False).run()
    a, b = weights(straight), weights(split)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


def test_adversarial_term_trains_a_patch_discriminator(tmp_path):
    out = tmp_path / "adv"
    assert main(["train-ae", "--out", str(out), "--n_batches", "20", "--adv_weight", "0.1", "--adv_start", "10",
                 *TINY_AE]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert "loss_d" not in log[0] and "loss_d" in log[-1] and "loss_g" in log[-1]
    state = torch.load(out / "checkpoints" / "step_0000020" / "training_state.pt", weights_only=True)
    assert "discriminator" in state  # resumable with its discriminator


@pytest.mark.parametrize("argv, expected", [
    (["--crop", "5"], "--crop 5 must be a multiple of the factor 2"),
    (["--widths", "8,10"], "divisible by --norm_groups 4"),
    (["--img_size", "15"], "not divisible by the downsampling factor"),
    (["--lr", "0"], "--lr must be > 0"),
])
def test_train_ae_bad_input_is_one_line(tmp_path, capsys, argv, expected):
    code = main(["train-ae", "--out", str(tmp_path / "r"), *TINY_AE, *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and expected in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_own_spec_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_latent_space(f"own:{tmp_path / 'nothing'}")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="holds no autoencoder"):
        load_latent_space(f"own:{tmp_path / 'junk'}")
