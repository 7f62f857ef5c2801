"""Big sampling jobs stay in bounded memory and stop cleanly; broken and half-written files never stop a resume
that could go on, and never end in a traceback."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from cclddg.cli import main
from cclddg.errors import TrainingError, UserError
from cclddg.paths import undone_if_failed
from cclddg.run_config import resolve
from cclddg.training.trainer import Trainer
from tiny import TRAIN



def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cclddg", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("robust") / "run"
    assert main(["train", "--out", str(out), *TRAIN, "--n_batches", "4", "--save_models_every", "2"]) == 0
    return out


# ---- big sampling jobs -------------------------------------------------------------------------------------
def test_sampling_in_batches_writes_every_single_and_the_grid(run, tmp_path):
    out, singles = tmp_path / "grid.png", tmp_path / "singles"
    assert main(["sample", "--checkpoint", str(run), "--attrs", "color=red", "--n", "7", "--batch_size", "3",
                 "-o", str(out), "--singles", str(singles), "--cfg", "1,2", "--no_progress"]) == 0
    assert sorted(p.name for p in singles.iterdir()) == [f"{i:05d}.png" for i in range(14)]
    assert Image.open(out).size == (2 * 18 + 2, 7 * 18 + 2)  # a guidance sweep: one column per scale
    # the same seed and batch size give the same images; the grid cell of sample i, scale g is i * 2 + g
    again = tmp_path / "again"
    assert main(["sample", "--checkpoint", str(run), "--attrs", "color=red", "--n", "7", "--batch_size", "3",
                 "--singles", str(again), "--cfg", "1,2", "--no_progress"]) == 0
    for i in range(14):
        assert Image.open(again / f"{i:05d}.png").tobytes() == Image.open(singles / f"{i:05d}.png").tobytes()


def test_a_grid_too_large_for_one_image_is_refused_before_sampling(run, tmp_path):
    start = time.perf_counter()
    result = cli("sample", "--checkpoint", str(run), "--n", "2000000", "-o", str(tmp_path / "g.png"))
    assert result.returncode == 2 and "too large for one image" in result.stderr and "--singles" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert time.perf_counter() - start < 60 and not (tmp_path / "g.png").exists()


def sigint_default() -> None:
    """The child takes Ctrl-C even when the tests run in the background (where SIGINT starts out ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_while_sampling_keeps_the_singles_and_says_so(run, tmp_path):
    singles = tmp_path / "singles"
    proc = subprocess.Popen([sys.executable, "-m", "cclddg", "sample", "--checkpoint", str(run), "--n", "1000000",
                             "--batch_size", "16", "--singles", str(singles)], stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_default)
    deadline = time.monotonic() + 120
    while not (singles.is_dir() and len(list(singles.iterdir())) >= 32):
        assert proc.poll() is None and time.monotonic() < deadline, "sampling did not start"
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip() and "\r" not in line and "%|" not in line]
    assert proc.returncode == 130 and len(lines) == 1 and "interrupted after" in lines[0], stderr
    written = sorted(singles.iterdir())
    assert len(written) >= 32 and all(p.suffix == ".png" and not p.name.startswith(".") for p in written)
    for path in written:
        Image.open(path).verify()  # every file whole


# ---- resuming ----------------------------------------------------------------------------------------------
def test_resume_after_a_nonfinite_stop_accepts_the_advised_changes(tmp_path):
    cfg = resolve("ddgan", dict(img_size=16, n_channels_unet=8, ch_mults=(1, 2), is_attn=(False, False),
                                n_channels_disc=8, ch_mults_disc=(1, 2), is_attn_disc=(False, False),
                                batch_size=4, n_batches=2, save_models_every=2, log_images_every=100))
    out = tmp_path / "run"
    trainer = Trainer(cfg, out, progress=False)
    trainer.run()
    trainer.cfg = replace(trainer.cfg, n_batches=4)
    with torch.no_grad():
        next(trainer.gen.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingError, match="Lower --lr_gen/--lr_disc or raise --r1_gamma, then --resume") as err:
        trainer.run()
    trainer.close()
    assert main(["train", "--out", str(out), "--resume", "--n_batches", "4", "--lr_gen", "1e-5", "--lr_disc", "2e-5",
                 "--r1_gamma", "0.5", "--skip_nonfinite", "true", "--no_progress"]) == 0, str(err.value)
    saved = json.loads((out / "config.json").read_text())
    assert (saved["lr_gen"], saved["lr_disc"], saved["r1_gamma"], saved["skip_nonfinite"]) == (1e-5, 2e-5, 0.5, True)
    notes = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "resumed_with" in r]
    assert len(notes) == 1 and notes[0]["step"] == 2
    assert notes[0]["resumed_with"]["lr_gen"] == 1e-5 and notes[0]["was"]["lr_gen"] == cfg.lr_gen
    state = torch.load(out / "checkpoints" / "step_0000004" / "training_state.pt", weights_only=True)
    assert state["opt_g"]["param_groups"][0]["lr"] == 1e-5 and state["opt_d"]["param_groups"][0]["lr"] == 2e-5


def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TRAIN, "--n_batches", "4", "--save_models_every", "2"]) == 0
    weights = out / "checkpoints" / "step_0000004" / "generator" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    result = cli("train", "--out", str(out), "--resume", "--n_batches", "6", "--no_progress")
    assert result.returncode == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if "damaged" in line]
    assert len(warning) == 1 and "step_0000004" in warning[0] and "step_0000002" in warning[0]
    assert "Traceback" not in result.stderr
    assert (out / "checkpoints" / "latest").read_text() == "step_0000006"


def test_no_intact_checkpoint_is_one_line(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TRAIN, "--n_batches", "2"]) == 0
    (out / "checkpoints" / "step_0000002" / "training_state.pt").write_bytes(b"")
    result = cli("train", "--out", str(out), "--resume", "--n_batches", "4", "--no_progress")
    assert result.returncode == 2 and "no intact checkpoint" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_leftovers_of_killed_writes_and_deletions_are_cleaned_on_resume(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TRAIN, "--n_batches", "2"]) == 0
    ckpts = out / "checkpoints"
    leftovers = [ckpts / ".tmp-del-step_0000001", ckpts / ".tmp-step_0000003", ckpts / ".latest.4242.tmp",
                 out / ".config.json.4242.tmp"]
    for path in leftovers[:2]:
        (path / "generator").mkdir(parents=True)
    for path in leftovers[2:]:
        path.write_text("half")
    assert main(["train", "--out", str(out), "--resume", "--n_batches", "3", "--no_progress"]) == 0
    assert [p for p in leftovers if p.exists()] == []
    assert (ckpts / "latest").read_text() == "step_0000003"


@pytest.mark.parametrize("text, expected", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "is a JSON object of settings, not a list"),
    ('"a string"', "not a str"),
    ("__config_with_a_string_number__", "--lr_gen must be a number, got 'fast'"),
    ('{"foo": 1, "bar": 2}', "unknown train config keys bar, foo"),
])
def test_a_malformed_run_config_is_one_line(tmp_path, text, expected):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TRAIN, "--n_batches", "1"]) == 0
    if text == "__config_with_a_string_number__":
        values = json.loads((out / "config.json").read_text())
        text = json.dumps({**values, "lr_gen": "fast"})
    (out / "config.json").write_text(text)
    result = cli("train", "--out", str(out), "--resume", "--n_batches", "2")
    assert result.returncode == 2 and expected in result.stderr and "config.json" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and len(result.stderr) < 400


def test_a_folder_of_something_else_is_not_called_a_run(tmp_path):
    out = tmp_path / "other"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({f"setting_{i}": i for i in range(100)}))
    result = cli("train", "--out", str(out), *TRAIN)
    assert result.returncode == 2 and "holds no cclddg run" in result.stderr and "another run" not in result.stderr
    result = cli("train", "--out", str(out), "--resume")
    assert result.returncode == 2 and len(result.stderr) < 400


# ---- failed starts -----------------------------------------------------------------------------------------
def test_a_failed_encode_leaves_nothing_that_blocks_the_next_try(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.png").write_text("not an image")
    out = tmp_path / "cache"
    result = cli("encode", "--data", f"folder:{images}", "--autoencoder", "pixels", "--out", str(out),
                 "--no_progress")
    assert result.returncode == 2 and "no usable image" in result.stderr.splitlines()[-1]
    assert not out.exists()
    for i in range(3):
        Image.new("RGB", (20, 20), (200, 10 * i, 0)).save(images / f"{i}.png")
    result = cli("encode", "--data", f"folder:{images}", "--autoencoder", "pixels", "--out", str(out),
                 "--img_size", "16", "--no_progress")
    assert result.returncode == 0, result.stderr


def test_undone_if_failed_restores_the_folder_as_it_was(tmp_path):
    new, empty, kept = tmp_path / "new", tmp_path / "empty", tmp_path / "kept"
    empty.mkdir()
    for folder in (new, empty):
        with pytest.raises(RuntimeError), undone_if_failed(folder, lambda: False):
            (folder / "sub").mkdir(parents=True)
            (folder / "config.json").write_text("{}")
            raise RuntimeError("failed")
    assert not new.exists() and empty.is_dir() and list(empty.iterdir()) == []
    with pytest.raises(KeyboardInterrupt), undone_if_failed(kept, lambda: True):
        kept.mkdir()
        (kept / "checkpoint").write_text("worth keeping")
        raise KeyboardInterrupt
    assert (kept / "checkpoint").is_file()


# ---- broken inputs -----------------------------------------------------------------------------------------
def png_header(width: int, height: int) -> bytes:
    """The first bytes of a PNG that claims a size (PIL reads the size before any pixel)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def test_a_decompression_bomb_is_one_line(tmp_path):
    from cclddg.pipeline import read_image

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(20000, 20000))
    with pytest.raises(UserError, match="too large to read safely"):
        read_image(bomb)


def test_a_large_prompt_image_is_read_small(tmp_path):
    from cclddg.pipeline import READ_SIDE, read_image

    path = tmp_path / "big.png"
    Image.new("RGB", (3000, 1500), (255, 0, 0)).save(path)
    image = read_image(path)
    assert image.shape == (3, READ_SIDE // 2, READ_SIDE) and float(image[0].mean()) == 1.0


def test_control_characters_are_not_a_prompt():
    from cclddg.encoders.base import Embedder

    with pytest.raises(UserError, match="only control characters"):
        Embedder.check_prompt(None, "\x00\x01\x1b\n\t")  # type: ignore[arg-type]


def test_python_dash_m_cclddg_runs_the_command_line():
    result = cli("--help")
    assert result.returncode == 0 and "train-cloob" in result.stdout
