"""Fixtures several test files share: tiny trained runs and their exported model folders (built once)."""

from __future__ import annotations

import shutil

import pytest

from cclddg.cli import main


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where CUDA is."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


TINY_AE = ["--img_size", "16", "--widths", "8,16", "--latent_channels", "3", "--norm_groups", "4", "--crop", "0",
           "--train_size", "64", "--batch_size", "8", "--n_batches", "4", "--eval_size", "8", "--no_progress"]
TINY_CLOOB = ["--img_size", "16", "--widths", "8,16", "--dim", "16", "--train_size", "64", "--batch_size", "16",
              "--eval_size", "16", "--n_batches", "4", "--warmup", "2", "--no_progress"]
TINY_GEN = ["--preset", "fast", "--img_size", "16", "--n_channels_unet", "8", "--ch_mults", "1,2", "--is_attn", "0,0",
            "--n_channels_disc", "8", "--ch_mults_disc", "1,2", "--is_attn_disc", "0,0", "--batch_size", "4",
            "--z_dim", "4", "--n_z_channels", "8", "--n_cond_channels", "8", "--cond_map_size", "0",
            "--data_size", "32", "--n_batches", "3", "--no_progress"]


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """A latent embedding run (own autoencoder + own CLOOB, with the text priors' statistics and a learned prior
    trained for 20 steps) and a label run."""
    root = tmp_path_factory.mktemp("runs")
    assert main(["train-ae", "--out", str(root / "ae"), *TINY_AE]) == 0
    assert main(["train-cloob", "--out", str(root / "cloob"), *TINY_CLOOB]) == 0
    assert main(["train", "--out", str(root / "text"), *TINY_GEN, "--autoencoder", f"own:{root / 'ae'}",
                 "--data", "shapes:16", "--encoder", f"cloob-tiny:{root / 'cloob'}", "--text_prior", "flow", "--prior_steps", "20",
                 "--cache_dir", str(root / "cache")]) == 0
    assert main(["train", "--out", str(root / "labels"), *TINY_GEN]) == 0
    return root


@pytest.fixture(scope="session")
def tiny_models(tiny_runs, tmp_path_factory):
    """Both runs exported, then moved to another folder (nothing may point back)."""
    out = {}
    for name in ("text", "labels"):
        first = tmp_path_factory.mktemp("export") / name
        assert main(["export", str(tiny_runs / name), str(first), "--guidance", "2"]) == 0
        moved = tmp_path_factory.mktemp("moved") / f"{name}-model"
        shutil.move(str(first), moved)
        out[name] = moved
    return out
