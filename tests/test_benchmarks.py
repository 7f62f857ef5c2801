"""Every benchmark runs end to end in its `--tiny` mode, so a change that breaks one fails here: benchmarks
cannot rot. (serve_roundtrip measures a model: it runs on the tests' tiny exported one, in Chromium.)

Marked slow (a process each, torch imported every time: about a quarter of the suite's CPU time): `pytest -m
slow` runs them, and CI does."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SKIPPED = {"serve_roundtrip.py"}
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")
                 if p.name not in SKIPPED and not p.name.startswith("_"))  # _*.py: what the benchmarks share


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_runs_tiny(script):
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", "--tiny"], cwd=ROOT, capture_output=True,
                          text=True, timeout=180, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip(), f"{script} printed no figures"


def test_the_serve_benchmark_runs_on_a_model(tiny_models):
    proc = subprocess.run([sys.executable, "benchmarks/serve_roundtrip.py", str(tiny_models["text"]), "--n", "1",
                           "--repeats", "1", "--threads", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=180, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the page in Chromium" in proc.stdout and "x the pipeline" in proc.stdout


def test_the_seed_benchmark_runs_a_training_scripts_own_loop_on_the_cpu(tmp_path):
    """seed_side_by_side reads the seed's parser, train() set-up and loop body from its file and runs them with
    .cuda() and torch.cuda.FloatTensor on the CPU (CI has no seed checkout: a script of the same shape here)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from seed_side_by_side import read_seed_script
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    script = tmp_path / "train_cclddg.py"
    script.write_text(textwrap.dedent("""
        import argparse
        def train(args):
            totals = []
            if args.dataset != 'celebA':
                return 0
            for i in range(args.n_batches):
                images = torch.ones(2, 3).cuda() * 2 - 1
                mask = torch.cuda.FloatTensor(2, 1).uniform_()
                totals.append(images.t().view(-1).sum().item() + mask.shape[0])
        parser = argparse.ArgumentParser()
        parser.add_argument('--n_batches', type=int, default=3)
        parser.add_argument('--dataset', default='celebA')
        args = parser.parse_args()
        train(args)
    """))
    seed = read_seed_script(script)
    names = {"argparse": __import__("argparse")}
    exec(seed.parser, names)
    ns = {"torch": torch, "device": torch.device("cpu"), "args": names["parser"].parse_args([])}
    exec(seed.setup, ns)
    ns.update(ns["seed_setup"]())
    exec(seed.loop_body, ns)
    exec(seed.loop_body, ns)
    assert ns["totals"] == [8.0, 8.0]  # 6 ones made 1 each, + the mask's 2 rows; .view of a transpose reshaped
