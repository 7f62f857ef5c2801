"""Every benchmark runs end to end in its `--tiny` mode, so a change that breaks one fails here: benchmarks
cannot rot. (serve_roundtrip measures a model: it runs on the tests' tiny exported one, in Chromium.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIPPED = {"serve_roundtrip.py"}
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if p.name not in SKIPPED)


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
