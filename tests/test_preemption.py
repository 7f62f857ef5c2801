"""A scheduler's SIGTERM (or SLURM's SIGUSR1) stops every long command like Ctrl-C, after the step it is in: real
signals to real processes, with no step lost, one line saying how to continue, and exit code 143."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from tiny import AE, CLOOB, TRAIN

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
ENDLESS = "100000"


def start(*args: str, script: str | None = None) -> subprocess.Popen:
    """`cclddg ARGS` (or a driver script taking them) in its own process, as a scheduler starts it."""
    head = [sys.executable, "-c", script] if script else [sys.executable, "-m", "cclddg.cli"]
    return subprocess.Popen([*head, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def wait_for(proc: subprocess.Popen, ready, what: str, limit: float = 180) -> None:
    deadline = time.monotonic() + limit
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"{what}: the process ended first: {proc.communicate()[1][-2000:]}")
        assert time.monotonic() < deadline, f"{what} did not happen in {limit} s"
        time.sleep(0.05)


def logged_steps(log: Path) -> int:
    return log.read_text().count("\n") if log.is_file() else 0


def last_logged_step(log: Path) -> int:
    return json.loads(log.read_text().splitlines()[-1])["step"]


def checkpoint_step(run: Path) -> int:
    return int((run / "checkpoints" / "latest").read_text().removeprefix("step_"))


def messages(stderr: str) -> list[str]:
    """stderr without progress bars."""
    return [line for line in stderr.splitlines() if line.strip() and "\r" not in line and "%|" not in line]


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> tuple[str, str]:
    proc.send_signal(sig)
    return proc.communicate(timeout=120)


def assert_stopped_and_resumable(proc, stderr: str, run: Path, command: str, sig_name: str = "SIGTERM") -> int:
    """Exit 143, one line naming the signal, the step and the resume command; the checkpoint is at the last step
    the log recorded (no step lost). Returns that step."""
    lines = messages(stderr)
    assert proc.returncode == 143, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"stopped by {sig_name} at step "), lines
    assert f"continue with: cclddg {command}" in lines[0] and "--resume" in lines[0], lines
    step = checkpoint_step(run)
    assert step == last_logged_step(run / "log.jsonl") and f"at step {step};" in lines[0], (step, lines)
    return step


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_checkpoints_the_step_reached_and_resume_continues(tmp_path, sig):
    run = tmp_path / "run"
    proc = start("train", "--out", str(run), *TRAIN, "--n_batches", ENDLESS, "--log_every", "1",
                 "--log_images_every", ENDLESS, "--save_models_every", ENDLESS)
    wait_for(proc, lambda: logged_steps(run / "log.jsonl") >= 3, "three steps")
    _, stderr = stop(proc, sig)
    step = assert_stopped_and_resumable(proc, stderr, run, f"train --out {run}", signal.Signals(sig).name)
    resumed = subprocess.run([sys.executable, "-m", "cclddg.cli", "train", "--out", str(run), "--resume",
                              "--n_batches", str(step + 2), "--log_every", "1", "--no_progress"],
                             capture_output=True, text=True, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert checkpoint_step(run) == step + 2


SIGNAL_IN_CHECKPOINT = textwrap.dedent("""
    import os, signal, sys
    from cclddg.training import checkpoint
    original, calls = checkpoint.write_text_atomic, []

    def pointer_then_signal(path, *args, **kwargs):  # the checkpoint folder is in place, `latest` not yet
        calls.append(path.name == "latest")
        if sum(calls) == 2 and calls[-1]:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(path, *args, **kwargs)

    checkpoint.write_text_atomic = pointer_then_signal
    from cclddg.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_a_signal_during_a_checkpoint_write_waits_for_it(tmp_path):
    run = tmp_path / "run"
    proc = start("train", "--out", str(run), *TRAIN, "--n_batches", ENDLESS, "--log_every", "1",
                 "--log_images_every", ENDLESS, "--save_models_every", "2", script=SIGNAL_IN_CHECKPOINT)
    _, stderr = proc.communicate(timeout=300)
    assert assert_stopped_and_resumable(proc, stderr, run, f"train --out {run}") == 4  # the second checkpoint
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_0000002", "step_0000004"]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train-cloob", "train-ae", "train-prior"])
def test_the_small_trainers_stop_on_a_signal_like_on_ctrl_c(tmp_path, command, tiny_runs):
    from test_bad_input import fresh_text_run

    if command == "train-prior":
        run = fresh_text_run(tiny_runs / "text", tmp_path / "text")
        args = ["train-prior", str(run), "--batch_size", "8", "--eval_size", "2", "--width", "16", "--no_progress"]
        folder, resume = run / "prior", f"train-prior {run}"
    else:
        folder = tmp_path / "run"
        args = [command, "--out", str(folder), *(CLOOB if command == "train-cloob" else AE)]
        resume = f"{command} --out {folder}"
    proc = start(*args, "--n_batches", ENDLESS, "--log_every", "1", "--save_every", ENDLESS)
    wait_for(proc, lambda: logged_steps(folder / "log.jsonl") >= 3, "three steps")
    _, stderr = stop(proc)
    assert_stopped_and_resumable(proc, stderr, folder, resume)


@pytest.mark.slow
def test_encode_keeps_its_finished_shards_on_a_signal(tmp_path):
    out = tmp_path / "cache"
    proc = start("encode", "--data", "shapes:16", "--n", "4096", "--shard_size", "16", "--batch_size", "16",
                 "--autoencoder", "pixels", "--out", str(out), "--no_progress")
    wait_for(proc, lambda: len(list(out.glob("shard_*"))) >= 2, "two shards")
    _, stderr = stop(proc)
    lines = messages(stderr)
    assert proc.returncode == 143 and len(lines) == 1, stderr[-2000:]
    assert lines[0].startswith("stopped by SIGTERM; ") and "finished shards are kept" in lines[0], lines
    kept = int(lines[0].split("; ")[1].split()[0])
    assert kept >= 2 and not list(out.glob(".*tmp*")), lines


@pytest.mark.slow
def test_sample_says_what_it_kept_on_a_signal(tmp_path, tiny_runs):
    singles = tmp_path / "singles"
    proc = start("sample", "--checkpoint", str(tiny_runs / "labels"), "--n", "1000000", "--batch_size", "16",
                 "--singles", str(singles), "--no_progress")
    wait_for(proc, lambda: singles.is_dir() and len(list(singles.iterdir())) >= 16, "16 singles")
    _, stderr = stop(proc)
    lines = messages(stderr)
    assert proc.returncode == 143 and len(lines) == 1 and lines[0].startswith("cclddg sample: stopped by SIGTERM after"), lines


@pytest.mark.slow
def test_serve_stops_cleanly_on_a_signal(tiny_models):
    proc = start("serve", str(tiny_models["labels"]), "--port", "0")
    line = proc.stdout.readline()
    url = line.split(" on ")[1].split()[0]
    assert urllib.request.urlopen(url, timeout=30).status == 200
    out, stderr = stop(proc)
    assert proc.returncode == 0 and messages(stderr) == ["cclddg serve: stopped by SIGTERM; the server is closed"], stderr[-2000:]


@pytest.mark.slow
def test_a_signal_to_one_of_two_processes_stops_both_after_the_same_step(tmp_path):
    """torchrun with 2 CPU processes: SIGTERM to rank 1 alone; both stop after the same step, rank 0 writes the
    checkpoint with both ranks' RNG states, and the run resumes."""
    from test_distributed import write_images

    images, run = tmp_path / "images", tmp_path / "run"
    write_images(images)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "cclddg.cli", "train", "--out", str(run), *TRAIN, "--data", f"folder:{images}", "--cond", "none",
                             "--n_batches", ENDLESS, "--log_every", "1", "--log_images_every", ENDLESS,
                             "--save_models_every", ENDLESS], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    try:
        wait_for(proc, lambda: logged_steps(run / "log.jsonl") >= 3, "three steps")
        os.kill(rank_pid(proc.pid, 1), signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    lines = [line for line in messages(stderr) if line.startswith("stopped by SIGTERM at step")]
    assert len(lines) == 1, stderr[-3000:]  # rank 0 says it, once
    step = checkpoint_step(run)
    assert step == last_logged_step(run / "log.jsonl") and f"at step {step};" in lines[0]


def rank_pid(parent: int, rank: int) -> int:
    """The pid of torchrun's worker with RANK=rank."""
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"no worker with RANK={rank} under {parent}")
