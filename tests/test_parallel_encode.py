"""`cclddg encode` on 2 CPU processes (accelerate launch, gloo): each encodes its part of the source, rank 0 writes
one cache.json, and the cache holds what one process encodes, bad files counted across the parts; a stopped
encode resumes where each part stopped; another number of processes is refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cclddg.cli import main
from cclddg.data.latent_cache import LatentCache, PROGRESS_FILE
from cclddg.data.parallel_encode import encode_in_parts, part_folder
from cclddg.data.sources import open_source
from cclddg.encoders import load_embedder
from cclddg.errors import UserError
from cclddg.latents import load_latent_space
from tiny import AE, CLOOB

N_GOOD, BAD = 30, (3, 22)  # a folder of 32 images, two of them not images: one in each half


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    assert main(["train-ae", "--out", str(root / "ae"), *AE]) == 0
    assert main(["train-cloob", "--out", str(root / "cloob"), *CLOOB]) == 0
    folder = root / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_GOOD + len(BAD)):
        path = folder / f"{i:03d}.png"
        if i in BAD:
            path.write_bytes(b"not an image")
        else:
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
            path.with_suffix(".txt").write_text(f"picture {i}")
    flags = ["--data", f"folder:{folder}", "--img_size", "16", "--autoencoder", f"own:{root / 'ae'}",
             "--encoder", f"cloob-tiny:{root / 'cloob'}", "--shard_size", "4", "--no_progress", "--workers", "0"]
    assert main(["encode", "--out", str(root / "one"), *flags]) == 0
    return root, flags


def launch(flags: list[str], out, hf_home) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_HOME": str(hf_home)}
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "cclddg.cli", "encode", "--out", str(out), *flags],
                          capture_output=True, text=True, timeout=300, env=env)


def same_examples(a: LatentCache, b: LatentCache) -> None:
    assert len(a) == len(b) == N_GOOD and a.meta["scale"] == b.meta["scale"]
    x, y = a.get_batch(list(range(N_GOOD)), None), b.get_batch(list(range(N_GOOD)), None)
    assert x.keys() == y.keys() and all(np.array_equal(np.asarray(x[k]), np.asarray(y[k])) for k in x)
    assert x["captions"][:2] == ["picture 0", "picture 1"]


def test_two_processes_encode_what_one_does_and_count_bad_files_across_parts(setting, tmp_path):
    root, flags = setting
    result = launch(flags, tmp_path / "two", tmp_path / "hf")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("encoded 30 examples") == 1  # rank 0 reports, once
    two = LatentCache(tmp_path / "two")
    same_examples(LatentCache(root / "one"), two)
    assert two.meta["ranks"] == 2 and {s["name"].split("/")[0] for s in two.meta["shards"]} == \
        {"part-0-of-2", "part-1-of-2"}
    assert two.meta["skipped"]["skipped"] == 2 and two.meta["skipped"]["good"] == N_GOOD
    assert not (tmp_path / "two" / PROGRESS_FILE).exists()


def test_a_stopped_encode_resumes_each_part_and_other_process_counts_are_refused(setting, tmp_path, capsys):
    root, flags = setting
    out = tmp_path / "cache"
    # Stopped after rank 0 finished its part and before rank 1 wrote a shard: rank 0 alone, its barrier passing.
    source = open_source(flags[1], 16, seed=0)
    space, embedder = load_latent_space(f"own:{root / 'ae'}"), load_embedder(f"cloob-tiny:{root / 'cloob'}")
    with pytest.raises(UserError, match="part-1-of-2"):
        encode_in_parts(source, flags[1], 0, None, 16, space, embedder, out, rank=0, world=2, barrier=lambda: None,
                        shard_size=4, progress=False)
    done = part_folder(out, 0, 2)
    assert (out / PROGRESS_FILE).is_file() and json.loads((done / "cache.json").read_text())["count"] == 15
    written = {p: p.stat().st_mtime_ns for p in done.rglob("*")}
    assert main(["encode", "--out", str(out), *flags]) == 2  # one process cannot finish a two-process cache
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "processes: 2 then, 1 now" in err
    result = launch(flags, out, tmp_path / "hf")
    assert result.returncode == 0, result.stderr[-3000:]
    same_examples(LatentCache(root / "one"), LatentCache(out))
    assert {p: p.stat().st_mtime_ns for p in done.rglob("*")} == written  # rank 0's part kept, not redone
