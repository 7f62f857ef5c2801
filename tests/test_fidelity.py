"""The distribution metrics' plumbing on closed forms (not against the libraries themselves): identical sets,
two Gaussians and the Fréchet formula, a collapsed generator; features from a real-format (TorchScript,
random-weight) Inception file; the real features' cache; bad input in one line before any sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cclddg.cli import main
from cclddg.errors import UserError
from cclddg.evaluation.fidelity import (
    INCEPTION_DIM,
    cached_real_features,
    check_sizes,
    distribution_metrics,
    load_features,
    parse_metrics,
    quantize,
)


def gaussian(n: int, dim: int, mean: float = 0.0, std: float = 1.0, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(mean, std, (n, dim)))


def test_identical_sets_score_zero():
    """(KID's subsets of one pool overlap, which biases it a hair below 0: 1% of a shifted set's KID here.)"""
    x = gaussian(1000, 8)
    found = distribution_metrics(x, x.clone())
    same = distribution_metrics(x, gaussian(1000, 8, seed=5), ("kid",))  # another draw of the same Gaussian
    shifted = distribution_metrics(x, gaussian(1000, 8, mean=0.5, seed=1), ("kid",))
    assert abs(found["fid"]) < 1e-6
    assert abs(found["kid"]) < 0.02 * shifted["kid"] and abs(same["kid"]) < 3 * same["kid_std"]
    assert found["precision"] == 1.0 and found["recall"] == 1.0


def test_two_gaussians_give_the_frechet_formula():
    """N(0, I) vs N(m·1, s²I) in d dims: FID = d·m² + d·(1 - s)²."""
    d, m, s = 8, 0.5, 1.5
    found = distribution_metrics(gaussian(20000, d), gaussian(20000, d, m, s, seed=1), ("fid",))
    want = d * m ** 2 + d * (1 - s) ** 2
    assert found["fid"] == pytest.approx(want, rel=0.03)


def test_a_collapsed_generator_has_low_recall_and_high_fid():
    real = gaussian(1000, 8)
    collapsed = real[:1].repeat(1000, 1) + 1e-3 * gaussian(1000, 8, seed=2)  # one image, over and over
    varied = distribution_metrics(real, gaussian(1000, 8, seed=3), ("fid", "pr"))
    one = distribution_metrics(real, collapsed, ("fid", "pr"))
    assert one["recall"] < 0.05 < 0.8 < varied["recall"]
    assert one["fid"] > 5 * varied["fid"] and one["fid"] > 5


def test_metric_names_and_sizes_are_checked_first():
    assert parse_metrics("fid, kid") == ("fid", "kid")
    with pytest.raises(UserError, match="--metrics takes fid, kid, pr"):
        parse_metrics("fid,is")
    with pytest.raises(UserError, match="FID needs more images than the feature width"):
        check_sizes(("fid",), 256, 256)
    check_sizes(("kid", "pr"), 256, 256)  # KID and precision/recall do not need a full-rank covariance
    with pytest.raises(UserError, match="N x N distance matrices"):
        check_sizes(("pr",), 50_000, 16)


class TinyInception(torch.nn.Module):
    """The call signature of clean-fid's TorchScript Inception (float images in [0, 255] at 299 px), random
    weights: the same file format as inception-2015-12-05.pt."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 7, stride=8)
        self.head = torch.nn.Linear(16, INCEPTION_DIM)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        h = self.conv((x - 128) / 128).mean((2, 3))
        return self.head(h) if return_features else self.head(h)[:, :1008]


def test_inception_features_load_from_a_torchscript_file(tmp_path):
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(TinyInception()).save(str(path))
    features = load_features(f"inception:{path}")
    images = quantize(torch.rand(3, 3, 32, 32) * 2 - 1)
    out = features(images)
    assert out.shape == (3, INCEPTION_DIM) and out.dtype == torch.float64
    assert torch.equal(out, features(images))  # deterministic
    assert features.name == f"inception:{path}"


@pytest.mark.parametrize("content,words", [(b"not a model", "not a TorchScript FID Inception network"),
                                           (None, "no such file")])
def test_a_wrong_inception_file_is_one_line(tmp_path, content, words):
    path = tmp_path / "inception.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=words):
        load_features(f"inception:{path}")


def test_an_inception_of_another_width_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.jit.script(torch.nn.Sequential()).save(str(path))
    with pytest.raises(UserError, match="not a TorchScript FID Inception network"):
        load_features(f"inception:{path}")


def test_real_features_are_computed_once_per_key(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return gaussian(10, 4)

    key = {"data": "shapes:16", "size": 16, "features": "x", "n": 10, "seed": 0}
    first = cached_real_features(key, compute, tmp_path)
    again = cached_real_features(key, compute, tmp_path)
    other = cached_real_features({**key, "n": 11}, compute, tmp_path)
    assert len(calls) == 2 and torch.equal(first, again) and other is not None
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically


@pytest.mark.slow
def test_eval_reports_the_metrics_of_a_run_with_the_features_named(tiny_runs, tmp_path, capsys, monkeypatch):
    """`cclddg eval --metrics` on the tiny embedding run against held-out shapes, on its own CLOOB's features;
    the second time the real features come from the cache."""
    import json

    monkeypatch.setenv("CCLDDG_CACHE", str(tmp_path / "cache"))
    args = ["eval", "--checkpoint", str(tiny_runs / "text"), "--data", "shapes:16", "--metrics", "fid,kid,pr",
            "--n", "40", "--batch_size", "20"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["features"].startswith("the run's own embedder (cloob-tiny:") and report["n"] == 40
    assert report["asked_with"] == "captions" and report["fid"] > 0 and 0 <= report["recall"] <= 1
    assert len(list((tmp_path / "cache" / "features").glob("real-features-*.npy"))) == 1
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["fid"] == report["fid"]  # the same seed, the cached real features


def test_a_folder_with_some_captions_asks_with_captions_and_image_embeddings(tiny_runs, tmp_path, capsys,
                                                                            monkeypatch):
    """Real images are read a batch at a time; an image without a caption asks with its image embedding, one with
    a caption through the text prior; a folder with fewer than 2N images is one line before sampling."""
    import json

    from cclddg.data.shapes import make_sample

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(12):
        example = make_sample(i, seed=5, size=16)
        example.image.save(folder / f"{i:02d}.png")
        if i % 2:
            (folder / f"{i:02d}.txt").write_text(example.caption)
    monkeypatch.setenv("CCLDDG_CACHE", str(tmp_path / "cache"))
    args = ["eval", "--checkpoint", str(tiny_runs / "text"), "--data", f"folder:{folder}", "--metrics", "kid",
            "--batch_size", "4"]
    assert main([*args, "--n", "6"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["asked_with"] == "captions and image embeddings" and report["n"] == 6
    assert main([*args, "--n", "7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has 12 usable images" in err[0] and "--n 6 or less" in err[0], err


@pytest.mark.parametrize("extra,words", [(["--n", "10"], "FID needs more images than the feature width"),
                                         (["--metrics", "fid,is"], "--metrics takes"),
                                         (["--features", "inception:/nonexistent.pt"], "no such file")])
def test_eval_metrics_bad_input_is_one_line_before_sampling(tiny_runs, capsys, extra, words):
    args = ["eval", "--checkpoint", str(tiny_runs / "text"), "--data", "shapes:16", "--metrics", "fid,kid,pr",
            "--n", "40"]
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


@pytest.mark.slow
def test_training_logs_kid_on_its_own_features_and_plot_draws_it(tiny_runs, tmp_path):
    import json
    import math

    from tiny import GEN as TINY_GEN

    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY_GEN, "--n_batches", "4", "--autoencoder", f"own:{tiny_runs / 'ae'}",
                 "--data", "shapes:16", "--encoder", f"cloob-tiny:{tiny_runs / 'cloob'}", "--cache_dir",
                 str(tiny_runs / "cache"), "--kid_every", "2", "--kid_n", "8"]) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    kids = [r for r in records if "kid" in r]
    assert [r["step"] for r in kids] == [2, 4]
    assert all(math.isfinite(r["kid"]) and r["kid_seconds"] > 0 for r in kids)
    assert main(["plot", str(out), "-o", str(tmp_path / "plot.png")]) == 0


def test_training_kid_needs_an_embedding_run(tmp_path, capsys):
    from tiny import GEN as TINY_GEN

    assert main(["train", "--out", str(tmp_path / "run"), *TINY_GEN, "--kid_every", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--kid_every" in err[0] and "--cond embedding" in err[0], err
