"""Training without loss: exact resume after SIGKILL, mixed precision (R1 correct under loss scaling), gradient
accumulation, learning-rate warmup, and the guards (non-finite steps, out of memory, a full disk)."""

from __future__ import annotations

import contextlib
import json
import math
import resource
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cclddg.objectives import ddgan
from cclddg.cli import main
from cclddg.errors import TrainingError
from cclddg.models import Discriminator
from cclddg.run_config import resolve
from cclddg.training import precision
from cclddg.training.trainer import Trainer
from tiny import TRAIN, with_flags

TINY = with_flags(TRAIN, "--tensorboard", "false")
TINY_CFG = dict(img_size=16, n_channels_unet=8, ch_mults=(1, 2), is_attn=(False, False), n_channels_disc=8,
                ch_mults_disc=(1, 2), is_attn_disc=(False, False), batch_size=4, z_dim=4, n_z_channels=8,
                n_cond_channels=8, log_images_every=1000, tensorboard=False)


def weights(run: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the run's latest checkpoint: generator, EMA and discriminator."""
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text()
    return {f"{net}.{k}": v for net in ("generator", "generator_ema", "discriminator")
            for k, v in load_file(ckpt / net / "diffusion_pytorch_model.safetensors").items()}


def log_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_a_run_killed_with_sigkill_resumes_bit_identical(tmp_path):
    """SIGKILL at whatever step it lands on, resume from the last checkpoint: the same weights and the same log
    as a run that was never interrupted. Every run is a fresh process with the same thread count (a float sum
    split over another number of threads may round differently)."""
    common = [*TINY, "--lazy_reg", "2", "--save_models_every", "5", "--log_every", "1", "--log_images_every", "1000",
              "--pct_zeros", "0.3", "--threads", "1"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train = [sys.executable, "-m", "cclddg.cli", "train"]
    subprocess.run([*train, "--out", str(straight), *common, "--n_batches", "40"], check=True, timeout=300)

    proc = subprocess.Popen([*train, "--out", str(killed), *common, "--n_batches", "100000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log, deadline = killed / "log.jsonl", time.monotonic() + 120
    while not (log.exists() and log.read_text().count("\n") >= 12):
        assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = log_records(killed)[-1]["step"]
    saved = (killed / "checkpoints" / "latest").read_text()
    assert killed_at < 40, "the run went past the comparison point before it was killed"

    subprocess.run([*train, "--out", str(killed), *common, "--n_batches", "40", "--resume"], check=True, timeout=300)
    a, b = weights(straight), weights(killed)
    assert a.keys() == b.keys()
    max_diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"\nkilled at step {killed_at}, resumed from {saved}, max abs parameter difference {max_diff}")
    assert max_diff == 0.0
    # The resumed log holds every step once, with the same losses as the uninterrupted run.
    volatile = {"samples_per_s", "rss_mb"}
    strip = [{k: v for k, v in r.items() if k not in volatile} for r in log_records(killed)]
    assert strip == [{k: v for k, v in r.items() if k not in volatile} for r in log_records(straight)]


def _tiny_disc() -> Discriminator:
    torch.manual_seed(0)
    return Discriminator(image_channels=3, n_channels=8, ch_mults=(1, 2), is_attn=(False, False), n_blocks=1,
                         cond_dim=0, sample_size=16)


def _r1_and_grads(disc: Discriminator, scale: float, mode: str) -> tuple[float, list[torch.Tensor]]:
    torch.manual_seed(1)
    x_prev, fake, x_t = (torch.randn(4, 3, 16, 16) for _ in range(3))
    t = torch.tensor([1, 2, 3, 4])
    disc.zero_grad()
    with precision.autocast(mode, torch.device("cpu")):
        loss, logs = ddgan.discriminator_loss(disc, x_prev, fake, x_t, t, None, r1_weight=10.0, grad_scale=scale)
    (loss * scale).backward()
    return logs["r1"], [p.grad / scale for p in disc.parameters()]


def test_r1_penalty_and_its_gradients_do_not_depend_on_the_loss_scale():
    disc = _tiny_disc()
    r1, grads = _r1_and_grads(disc, 1.0, "no")
    assert r1 > 0
    r1_scaled, grads_scaled = _r1_and_grads(disc, 2.0 ** 16, "no")
    assert r1_scaled == pytest.approx(r1, rel=1e-5)
    for g, gs in zip(grads, grads_scaled):
        torch.testing.assert_close(gs, g, rtol=1e-4, atol=1e-9)


def test_r1_in_fp16_needs_the_loss_scale():
    """With D's last layer scaled down, its input gradients are ~1e-9, below fp16's smallest subnormal (6e-8):
    they underflow to zero unless taken of the scaled output, as the trainer does with its loss scaler's scale."""
    disc = _tiny_disc()
    last = [m for m in disc.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(1e-5)
    r1, _ = _r1_and_grads(disc, 1.0, "no")
    assert r1 > 0
    assert _r1_and_grads(disc, 1.0, "fp16")[0] == 0.0  # underflowed
    assert _r1_and_grads(disc, 2.0 ** 10, "fp16")[0] == pytest.approx(r1, rel=0.02)


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_mixed_precision_trains_and_resumes(tmp_path, mode):
    run = tmp_path / "run"
    args = ["train", "--out", str(run), *TINY, "--mixed_precision", mode, "--lazy_reg", "1", "--log_every", "1",
            "--save_models_every", "3"]
    assert main([*args, "--n_batches", "3"]) == 0
    assert main([*args, "--n_batches", "5", "--resume"]) == 0
    records = log_records(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    # fp16: the first scale (2^16) overflows R1's gradient; the scaler skips that update and halves the scale.
    for r in records[1:] if mode == "fp16" else records:
        for key in ("loss_d", "loss_g", "d_real", "d_fake", "r1"):
            assert r[key] is not None and abs(r[key]) < 1e3, (key, r)
    state = torch.load(run / "checkpoints" / "step_0000005" / "training_state.pt", weights_only=True)
    if mode == "fp16":  # the loss scalers' state travels with the checkpoint
        assert 1 < state["scaler_d"]["scale"] < 2.0 ** 16 and state["scaler_g"]["scale"] > 1
    else:
        assert state["scaler_d"] == {}
    assert all(torch.isfinite(v).all() for v in weights(run).values())


def test_gradient_accumulation_reads_the_whole_global_batch(tmp_path):
    cfg = resolve("ddgan", dict(TINY_CFG, grad_accum=3, n_batches=2, save_models_every=2))
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    assert trainer.global_batch == 12
    read = [trainer.example_indices(s, m) for s in range(2) for m in range(3)]
    assert sum(read, []) == list(range(24))  # consecutive micro-batches, nothing twice
    trainer.run()
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_0000002" / "training_state.pt", weights_only=True)
    assert state["position"] == 24 and state["grad_accum"] == 3


def test_learning_rate_warmup_is_logged_and_resumed(tmp_path):
    run = tmp_path / "run"
    args = ["train", "--out", str(run), *TINY, "--lr_warmup", "4", "--lr_gen", "0.0004", "--log_every", "1",
            "--save_models_every", "2"]
    assert main([*args, "--n_batches", "2"]) == 0
    assert main([*args, "--n_batches", "6", "--resume"]) == 0
    lrs = [r["lr_g"] for r in log_records(run)]
    assert lrs == pytest.approx([1e-4, 2e-4, 3e-4, 4e-4, 4e-4, 4e-4])


def test_learning_rate_decay_is_one_schedule_across_a_resume_and_ends_at_zero(tmp_path):
    run = tmp_path / "run"
    args = ["train", "--out", str(run), *TINY, "--lr_warmup", "2", "--lr_decay", "4", "--lr_gen", "0.0004",
            "--log_every", "1", "--save_models_every", "2"]
    assert main([*args, "--n_batches", "2"]) == 0
    assert main([*args, "--n_batches", "6", "--resume"]) == 0  # longer than the decay: the rate stays at 0
    records = log_records(run)
    half = 0.5 * (1 + math.cos(math.pi / 4))  # the cosine a quarter of the way down
    expected = [4e-4 * 0.5 * 1.0, 4e-4 * half, 4e-4 * 0.5, 4e-4 * (1 - half), 0.0, 0.0]
    assert [r["lr_g"] for r in records] == pytest.approx(expected, rel=1e-5, abs=1e-12)  # the log keeps 6 digits
    expected_d = [lr / 4e-4 * 1.25e-4 for lr in expected]  # the discriminator's default rate, on the same schedule
    assert [r["lr_d"] for r in records] == pytest.approx(expected_d, rel=1e-5, abs=1e-12)


def _nan_generator(trainer: Trainer) -> None:
    with torch.no_grad():
        next(trainer.accelerator.unwrap_model(trainer.gen).parameters()).fill_(float("nan"))


def test_skip_nonfinite_drops_bad_updates_then_stops_when_they_persist(tmp_path):
    cfg = resolve("ddgan", dict(TINY_CFG, n_batches=2, save_models_every=2, log_every=1, skip_nonfinite=True))
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.run()
    disc_before = {k: v.clone() for k, v in trainer.accelerator.unwrap_model(trainer.disc).state_dict().items()}
    _nan_generator(trainer)
    trainer.cfg = replace(trainer.cfg, n_batches=5)
    trainer.run()  # fakes are NaN from now on: D's and G's updates are dropped, D's weights stay good
    assert trainer.nonfinite.skipped == 6
    for k, v in trainer.accelerator.unwrap_model(trainer.disc).state_dict().items():
        assert torch.equal(v, disc_before[k]), k
    assert log_records(tmp_path / "run")[-1]["skipped_updates"] == 6
    trainer.cfg = replace(trainer.cfg, n_batches=100)
    with pytest.raises(TrainingError, match=r"updates in a row had a non-finite loss or gradient.*diverged"):
        trainer.run()


def test_out_of_memory_says_what_to_lower(tmp_path):
    """A real allocation failure: the first activation is made larger than this machine's memory and swap."""
    if Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1":
        pytest.skip("this kernel overcommits every allocation: an oversized one would not fail")
    meminfo = dict(line.split(":") for line in Path("/proc/meminfo").read_text().splitlines())
    total = sum(int(meminfo[k].split()[0]) * 1024 for k in ("MemTotal", "SwapTotal"))
    per_example = 256 * 64 * 64 * 4  # the generator's first feature map: 256 channels at 64x64, fp32
    batch = 2 * total // per_example + 1
    result = subprocess.run([sys.executable, "-m", "cclddg.cli", "train", "--out", str(tmp_path / "run"),
                             "--img_size", "64", "--n_channels_unet", "256", "--ch_mults", "1", "--is_attn", "0",
                             "--n_channels_disc", "8", "--ch_mults_disc", "1", "--is_attn_disc", "0",
                             "--n_cond_channels", "8", "--z_dim", "4", "--n_z_channels", "8", "--data_size", "10",
                             "--batch_size", str(batch), "--n_batches", "1", "--no_progress", "--cond", "none"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-2000:]
    assert "out of memory at step 1" in lines[0] and "lower --batch_size" in lines[0]


@contextlib.contextmanager
def full_disk(max_bytes: int = 4096):
    """Writes past a file-size limit fail like writes to a full disk (EFBIG instead of ENOSPC)."""
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    cfg = resolve("ddgan", dict(TINY_CFG, n_batches=2, save_models_every=2))
    trainer = Trainer(cfg, run, progress=False)
    trainer.run()
    before = weights(run)
    trainer.cfg = replace(trainer.cfg, n_batches=4)
    with full_disk(), pytest.raises(TrainingError, match=r"could not write the checkpoint of step 4 .*the last "
                                                         r"good checkpoint .*step_0000002 is intact"):
        trainer.run()
    assert (run / "checkpoints" / "latest").read_text() == "step_0000002"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_0000002"]
    after = weights(run)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert main(["train", "--out", str(run), *TINY, "--n_batches", "4", "--resume"]) == 0  # space again: resume
    assert (run / "checkpoints" / "latest").read_text() == "step_0000004"


def test_a_full_disk_while_writing_the_grids_names_the_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    cfg = resolve("ddgan", dict(TINY_CFG, n_batches=2, save_models_every=2, log_every=1000))
    trainer = Trainer(cfg, run, progress=False)
    trainer.run()
    trainer.cfg = replace(trainer.cfg, n_batches=4, log_images_every=3)
    with full_disk(), pytest.raises(TrainingError, match=r"could not write the sample grids of step 3 .*the last "
                                                         r"good checkpoint .*step_0000002 is intact"):
        trainer.run()
    assert trainer.step == 3
    assert not [p.name for p in (run / "samples").iterdir() if "tmp" in p.name]  # no half-written grid left


@pytest.mark.slow
def test_compile_trains_like_eager(tmp_path):
    """torch.compile (the generator; D too without R1) gives the same training within float tolerance."""
    common = [*TINY, "--r1_gamma", "0", "--n_batches", "3", "--save_models_every", "3"]
    assert main(["train", "--out", str(tmp_path / "eager"), *common]) == 0
    assert main(["train", "--out", str(tmp_path / "compiled"), *common, "--compile", "true"]) == 0
    a, b = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_a_log_record_holds_the_means_since_the_previous_one_and_tensorboard_gets_scalars_and_grids(tmp_path):
    """Logging draws nothing from the RNG, so a run logging every step and one logging every 5 take the same steps:
    each record of the second is the mean of 5 of the first, and R1 (every 3rd step here) is in every record."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = [*TINY, "--lazy_reg", "3", "--n_batches", "10", "--log_images_every", "10"]
    every_step, every_5 = tmp_path / "every_step", tmp_path / "every_5"
    assert main(["train", "--out", str(every_step), *common, "--log_every", "1"]) == 0
    assert main(["train", "--out", str(every_5), *common[:-2], "--log_every", "5", "--tensorboard", "true"]) == 0
    steps, windows = log_records(every_step), log_records(every_5)
    assert [r["step"] for r in windows] == [5, 10]
    for record, window in zip(windows, (steps[:5], steps[5:])):
        for key in ("loss_d", "loss_g", "d_real", "d_fake", "grad_norm_d", "grad_norm_g", "lr_g"):
            assert record[key] == pytest.approx(sum(r[key] for r in window) / 5, rel=1e-4), key
        r1 = [r["r1"] for r in window if "r1" in r]
        assert len(r1) in (1, 2) and record["r1"] == pytest.approx(sum(r1) / len(r1), rel=1e-4)

    events = EventAccumulator(str(every_5 / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert {"loss_d", "loss_g", "d_real", "d_fake", "r1", "grad_norm_d", "grad_norm_g", "lr_g", "lr_d",
            "samples_per_s", "rss_mb"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss_d")] == [5, 10]
    assert set(events.Tags()["images"]) == {"samples", "reconstruction"}
    assert [e.step for e in events.Images("samples")] == [10]
