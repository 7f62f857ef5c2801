"""Data parallel on 2 CPU processes (torchrun, gloo): identical weights on every rank after every optimizer step,
and no example read by two ranks within an epoch (tests/scripts/ddp_worker.py does the training)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

WORKER = Path(__file__).parent / "scripts" / "ddp_worker.py"
N_IMAGES = 24


def write_images(folder: Path) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_two_processes_keep_identical_weights_and_disjoint_data(tmp_path, grad_accum):
    images, out = tmp_path / "images", tmp_path / "out"
    write_images(images)
    out.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(WORKER), str(images), str(out), str(grad_accum)],
                            capture_output=True, text=True, timeout=200, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["global_batch"] == 2 * 2 * grad_accum  # batch_size x processes x grad_accum
    steps0, steps1 = ranks[0]["steps"], ranks[1]["steps"]
    previous = None
    for a, b in zip(steps0, steps1, strict=True):
        for net in ("gen", "disc", "ema"):
            assert a[net] == b[net], f"{net} differs between ranks"
        if previous is not None:  # the weights did move, so equal digests mean synchronised updates
            assert a["gen"] != previous["gen"] and a["disc"] != previous["disc"]
        previous = a
        assert set(sum(a["read"], [])).isdisjoint(sum(b["read"], []))
    per_epoch = N_IMAGES // ranks[0]["global_batch"]
    for epoch in range(len(steps0) // per_epoch):
        read = [i for steps in (steps0, steps1) for s in steps[epoch * per_epoch:(epoch + 1) * per_epoch]
                for micro in s["read"] for i in micro]
        assert sorted(read) == list(range(N_IMAGES)), f"epoch {epoch}: an example read twice or never"

    # The loop on 2 processes: one log line per step (main process only), a checkpoint with both ranks' RNGs.
    run = out / "run"
    logged = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    n = len(steps0)
    assert logged == [n + 1, n + 2]
    state = torch.load(run / "checkpoints" / f"step_{n + 2:07d}" / "training_state.pt", weights_only=True)
    assert state["world_size"] == 2 and state["position"] == (n + 2) * ranks[0]["global_batch"]
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])


def test_cclddg_train_runs_under_accelerate_launch(tmp_path):
    """The command line itself on 2 CPU processes through accelerate's launcher: one run, one log, one checkpoint
    holding both ranks' RNG states, one "done" line."""
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
    tiny = ["--img_size", "16", "--n_channels_unet", "8", "--ch_mults", "1,2", "--is_attn", "0,0",
            "--n_channels_disc", "8", "--ch_mults_disc", "1,2", "--is_attn_disc", "0,0", "--batch_size", "4",
            "--z_dim", "4", "--n_z_channels", "8", "--n_cond_channels", "8", "--no_progress", "--tensorboard", "false"]
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                             "-m", "cclddg.cli", "train", "--out", str(run), *tiny, "--n_batches", "4",
                             "--log_every", "2"], capture_output=True, text=True, timeout=200, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done: 4 steps") == 1
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [2, 4]
    state = torch.load(run / "checkpoints" / "step_0000004" / "training_state.pt", weights_only=True)
    assert state["world_size"] == 2 and state["position"] == 4 * 2 * 4  # steps x processes x batch_size
    assert len(state["rng"]) == 2
