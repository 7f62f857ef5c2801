"""The CLI end to end on tiny models: train, resume, sample, eval, and every bad input giving one line."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cclddg.cli import main
from cclddg.errors import TrainingError
from cclddg.run_config import resolve
from cclddg.training.trainer import Trainer
from tiny import TRAIN



def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The real console entry point in a subprocess, to see exit codes and stderr as a user does."""
    return subprocess.run([sys.executable, "-m", "cclddg.cli", *args], capture_output=True, text=True, timeout=300)


def train(out: Path, *extra: str) -> int:
    return main(["train", "--out", str(out), *TRAIN, *extra])


def test_train_writes_the_documented_run_folder(tmp_path):
    out = tmp_path / "run"
    assert train(out, "--n_batches", "5", "--log_every", "1", "--log_images_every", "2",
                 "--save_models_every", "2") == 0
    assert json.loads((out / "config.json").read_text())["batch_size"] == 4
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert {"loss_d", "loss_g", "d_real", "d_fake", "samples_per_s"} <= set(records[0])
    grids = sorted(p.name for p in (out / "samples").glob("step_*.png"))
    assert grids == ["step_0000002.png", "step_0000004.png", "step_0000005.png"]
    assert Image.open(out / "samples" / "recon_0000005.png").size[0] > 16
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step_0000004", "step_0000005"]  # the last two
    assert (out / "checkpoints" / "latest").read_text() == "step_0000005"
    ckpt = out / "checkpoints" / "step_0000005"
    for name in ("generator", "generator_ema", "discriminator"):
        assert (ckpt / name / "diffusion_pytorch_model.safetensors").is_file()
    assert not list((out / "checkpoints").glob(".tmp*"))


def _params(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text()
    out = {}
    for name in ("generator", "generator_ema", "discriminator"):
        for k, v in load_file(ckpt / name / "diffusion_pytorch_model.safetensors").items():
            out[f"{name}.{k}"] = v
    return out


@pytest.mark.parametrize("preset", ["ddgan", "seed"])
def test_resume_matches_an_uninterrupted_run(tmp_path, preset):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--preset", preset, "--n_steps", "4", "--lazy_reg", "2", "--save_models_every", "3",
              "--log_images_every", "100", "--schedule", "vp", "--n_blocks", "1", "--n_blocks_disc", "1"]
    assert train(straight, *common, "--n_batches", "6") == 0
    assert train(split, *common, "--n_batches", "3") == 0
    assert train(split, *common, "--n_batches", "6", "--resume") == 0
    a, b = _params(straight), _params(split)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0


def test_diffusion_objective_trains_and_samples_with_ddim(tmp_path):
    out = tmp_path / "ddpm"
    assert train(out, "--preset", "diffusion", "--n_steps", "50", "--n_batches", "3",
                 "--log_images_every", "3") == 0
    assert not (out / "checkpoints" / "step_0000003" / "discriminator").exists()
    grid = tmp_path / "g.png"
    assert main(["sample", "--checkpoint", str(out), "-o", str(grid), "--n", "4", "--steps", "5"]) == 0
    assert Image.open(grid).size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)


def test_sample_is_reproducible_and_respects_seed(tmp_path):
    out = tmp_path / "run"
    assert train(out, "--n_batches", "2") == 0
    paths = [tmp_path / f"{name}.png" for name in ("a", "b", "c")]
    for path, seed in zip(paths, ("1", "1", "2")):
        assert main(["sample", "--checkpoint", str(out), "-o", str(path), "--n", "4", "--seed", seed,
                     "--attrs", "color=red,shape=circle", "--cfg", "2"]) == 0
    a, b, c = (np.asarray(Image.open(p)) for p in paths)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    singles = tmp_path / "singles"
    assert main(["sample", "--checkpoint", str(out), "--singles", str(singles), "--n", "3"]) == 0
    assert sorted(p.name for p in singles.iterdir()) == ["00000.png", "00001.png", "00002.png"]


def test_eval_on_real_shapes_is_near_perfect(tmp_path, capsys):
    report_path = tmp_path / "report.json"
    assert main(["eval", "--data", "shapes:32", "--n", "150", "-o", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["n"] == 150
    for key in ("validity", "color_acc", "shape_acc", "size_acc", "position_acc", "background_acc"):
        assert report[key] >= 0.99, key


def test_nonfinite_loss_stops_with_step_and_last_checkpoint(tmp_path):
    cfg = resolve("ddgan", dict(img_size=16, n_channels_unet=8, ch_mults=(1, 2), is_attn=(False, False),
                                n_channels_disc=8, ch_mults_disc=(1, 2), is_attn_disc=(False, False),
                                batch_size=4, n_batches=2, save_models_every=2, log_images_every=100))
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.run()
    trainer.cfg = replace(trainer.cfg, n_batches=4)
    with torch.no_grad():
        next(trainer.gen.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"non-finite loss or gradient of D at step 3; the last good checkpoint is .*step_0000002"):
        trainer.run()
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_0000002"


BAD_INPUTS = [
    (["train", "--bogus_flag", "1"], "unrecognized arguments: --bogus_flag"),
    (["train", "--preset", "nope"], "unknown preset 'nope'"),
    (["train", "--step_kind", "sideways"], "--step_kind 'sideways' is not valid"),
    (["train", "--ch_mults", "1,2,2", "--is_attn", "0,0"], "--is_attn has 2"),
    (["train", "--img_size", "30", "--ch_mults", "1,2,2", "--is_attn", "0,0,0"], "not divisible by 4"),
    (["train", "--n_channels_unet", "12"], "does not divide the width 12"),
    (["train", "--data", "imagenet"], "unknown data source 'imagenet'"),
    (["train", "--pct_zeros", "1.5"], "--pct_zeros must be in [0, 1)"),
    (["sample", "--checkpoint", "/nonexistent/run", "-o", "x.png"], "does not exist"),
    (["eval"], "give --checkpoint RUN or --data"),
]


@pytest.mark.parametrize("argv,expected", BAD_INPUTS, ids=[" ".join(a[:2]) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_clear_line(tmp_path, argv, expected):
    argv = [*argv, "--out", str(tmp_path / "r")] if argv[0] == "train" else argv
    result = run_cli(*argv)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert not (tmp_path / "r").exists()


def test_existing_run_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    assert train(out, "--n_batches", "2") == 0
    before = (out / "config.json").read_bytes(), (out / "log.jsonl").read_bytes()
    result = run_cli("train", "--out", str(out), *TRAIN, "--n_batches", "2")
    assert result.returncode != 0 and "holds another run" in result.stderr
    result = run_cli("train", "--out", str(out), *TRAIN, "--n_batches", "4", "--z_dim", "3", "--resume")
    assert result.returncode != 0 and "cannot resume" in result.stderr and "z_dim" in result.stderr
    assert ((out / "config.json").read_bytes(), (out / "log.jsonl").read_bytes()) == before


def test_truncated_checkpoint_is_reported(tmp_path):
    out = tmp_path / "run"
    assert train(out, "--n_batches", "2") == 0
    weights = out / "checkpoints" / "step_0000002" / "generator_ema" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    result = run_cli("sample", "--checkpoint", str(out), "-o", str(tmp_path / "x.png"))
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1
    assert "damaged" in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_ctrl_c_saves_a_checkpoint_and_resume_continues(tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "cclddg.cli", "train", "--out", str(out), *TRAIN,
                             "--n_batches", "100000", "--log_every", "1", "--log_images_every", "100000",
                             "--save_models_every", "100000"], stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even run in the background
    log = out / "log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.exists() and log.read_text().count("\n") >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "interrupted at step" in stderr and "--resume" in stderr
    step = int((out / "checkpoints" / "latest").read_text().removeprefix("step_"))
    assert step >= 3
    assert train(out, "--n_batches", str(step + 2), "--log_every", "1", "--resume") == 0
    assert (out / "checkpoints" / "latest").read_text() == f"step_{step + 2:07d}"


def test_the_seed_readme_command_parses():
    """The seed's README training command is valid here (only its dataset is not built in yet)."""
    from cclddg.cli import build_parser

    args = build_parser().parse_args(
        "train --z_dim 16 --n_channels_unet 64 --batch_size 64 --n_batches 200 --lr_gen 0.0001 --lr_disc 0.0001 "
        "--log_images_every 50 --save_models_every 500 --n_steps 8 --dataset celebA --wandb_project cclddg_faces".split())
    assert (args.z_dim, args.n_channels_unet, args.n_steps, args.data, args.wandb_project) == \
        (16, 64, 8, "celebA", "cclddg_faces")


def test_a_run_says_how_long_it_will_take_after_its_first_steps(tmp_path, capsys):
    assert train(tmp_path / "run", "--n_batches", "23", "--log_every", "23", "--log_images_every", "23",
                 "--save_models_every", "23") == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "steps/s" in line]
    assert len(lines) == 1 and "the remaining 3 steps take about" in lines[0], lines


def test_the_estimate_names_a_time_budget_that_ends_the_run_first():
    from cclddg.training.loop import estimate_line

    assert estimate_line("train", 2.0, 14400) == "train: 2.00 steps/s; the remaining 14400 steps take about 2.0 h"
    assert estimate_line("train-ae", 10.0, 300).endswith("take about 30 s")
    assert "budget stops it first" in estimate_line("train", 2.0, 7200, max_minutes=10)
    assert "budget" not in estimate_line("train", 2.0, 60, max_minutes=10)
