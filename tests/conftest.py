"""Fixtures several test files share: tiny trained runs and their exported model folders (built once per test
process), and one thread per process when the suite runs in several (pytest -n 2: two processes on two cores)."""

from __future__ import annotations

import os
import shutil

import pytest

from cclddg.cli import main
from tiny import AE, CLOOB, GEN


def pytest_configure(config):
    """With pytest-xdist's workers, each takes one thread (and so do the commands it starts): two processes of two
    OpenMP threads each on two cores run far below half speed, as their threads spin for each other."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where CUDA is."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)




@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """A latent embedding run (own autoencoder + own CLOOB, with the text priors' statistics and a learned prior
    trained for 20 steps) and a label run."""
    root = tmp_path_factory.mktemp("runs")
    assert main(["train-ae", "--out", str(root / "ae"), *AE]) == 0
    assert main(["train-cloob", "--out", str(root / "cloob"), *CLOOB]) == 0
    assert main(["train", "--out", str(root / "text"), *GEN, "--autoencoder", f"own:{root / 'ae'}",
                 "--data", "shapes:16", "--encoder", f"cloob-tiny:{root / 'cloob'}", "--text_prior", "flow", "--prior_steps", "20",
                 "--cache_dir", str(root / "cache")]) == 0
    assert main(["train", "--out", str(root / "labels"), *GEN]) == 0
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
