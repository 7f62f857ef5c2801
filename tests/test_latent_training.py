"""Training in a latent space: from a latent cache (labels or CLOOB embeddings), or from a source encoded into
one on the way; grids and samples decoded to pixels; a cache that contradicts the flags is refused."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from cclddg.cli import main
from cclddg.data.latent_cache import LatentCache
from cclddg.errors import UserError
from cclddg.model_folder import CCLDDGPipeline
from cclddg.pipeline import load_generator, sample
from cclddg.run_config import resolve
from tiny import AE, CLOOB, NETS, with_flags

TINY_AE = with_flags(AE, "--crop", "8", "--train_size", "128", "--batch_size", "16", "--eval_size", "16",
                     "--n_batches", "40", "--warmup", "5", drop=("--latent_channels",))
TINY_CLOOB = with_flags(CLOOB, "--train_size", "128", "--batch_size", "32", "--n_batches", "20")
# nets for 8x8x4 latents (16 px images, factor 2)
TINY_GEN = [*NETS, "--batch_size", "4", "--cond_map_size", "4", "--log_images_every", "3", "--save_models_every", "3",
            "--n_batches", "3", "--prior_steps", "5", "--no_progress"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent")
    assert main(["train-ae", "--out", str(root / "ae"), *TINY_AE]) == 0
    assert main(["train-cloob", "--out", str(root / "cloob"), *TINY_CLOOB]) == 0
    cache = root / "cache"
    assert main(["encode", "--data", "shapes:16", "--n", "48", "--shard_size", "20", "--autoencoder",
                 f"own:{root / 'ae'}", "--encoder", f"cloob-tiny:{root / 'cloob'}", "--out", str(cache),
                 "--no_progress"]) == 0
    return root


def test_cclddg_preset_trains_from_a_cache_and_samples_pixels(models, tmp_path):
    out = tmp_path / "gen"
    assert main(["train", "--preset", "cclddg", "--data", str(models / "cache"), "--out", str(out), *TINY_GEN]) == 0
    cfg = json.loads((out / "config.json").read_text())
    cache = LatentCache(models / "cache")
    # the cache fixed the latent space, sizes, scale and encoder of the run
    assert cfg["autoencoder"] == cache.autoencoder == f"own:{models / 'ae'}"
    assert (cfg["img_size"], cfg["latent_channels"], cfg["latent_factor"]) == (16, 4, 2)
    assert cfg["latent_scale"] == cache.scale and cfg["encoder"] == cache.encoder and cfg["data_size"] == 48
    # grids are decoded: 6x6 tiles of 16 px images (plus padding), not 8 px latents
    grid = Image.open(out / "samples" / "step_0000003.png")
    recon = Image.open(out / "samples" / "recon_0000003.png")
    assert grid.mode == "RGB" and grid.width >= 6 * 16
    assert recon.width >= 4 * 16 and recon.height >= 9 * 16  # batch 4 columns; rows x_0, then x_t and x̂_0 for T=4
    model, run_cfg = load_generator(out)
    assert model.config.image_channels == 4 and model.config.sample_size == 8
    pipe = CCLDDGPipeline.from_run(out)
    images = pipe(prompt=["a red circle in the top left"], num_images_per_prompt=2, guidance_scale=2.0).images
    assert [i.size for i in images] == [(16, 16), (16, 16)]
    # sampling decodes through the run's autoencoder with the cache's scale
    x = sample(model, run_cfg, 2, cond=pipe.conditioner()(["a blue square"]).repeat(2, 1), guidance=1.0,
               rng=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 16, 16) and x.min() >= -1 and x.max() <= 1


def test_label_run_from_a_cache_and_eval(models, tmp_path, capsys):
    out = tmp_path / "labels"
    assert main(["train", "--preset", "fast", "--data", str(models / "cache"), "--out", str(out), *TINY_GEN]) == 0
    assert json.loads((out / "config.json").read_text())["cond"] == "labels"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--n", "8", "--batch_size", "8"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 8 and report["color_n"] == 8 and 0 <= report["validity"] <= 1
    assert main(["sample", "--checkpoint", str(out), "--attrs", "color=red", "--n", "4", "-o", str(tmp_path / "s.png")]) == 0
    assert Image.open(tmp_path / "s.png").width >= 2 * 16


def test_the_same_command_with_a_relative_cache_path_resumes(models, tmp_path, monkeypatch):
    """The run records its cache by absolute path; the command that started it, a relative --data and all, resumes
    it (it was refused as a different config)."""
    monkeypatch.chdir(models)
    out = tmp_path / "gen"
    command = ["train", "--preset", "fast", "--data", "cache", "--out", str(out), *with_flags(TINY_GEN, "--n_batches", "2")]
    assert main(command) == 0
    assert json.loads((out / "config.json").read_text())["data"] == str(models / "cache")
    assert main([*with_flags(command, "--n_batches", "3"), "--resume"]) == 0
    assert (out / "checkpoints" / "step_0000003").is_dir()


def test_source_is_encoded_into_a_cache_on_the_way(models, tmp_path):
    out, cache_dir = tmp_path / "gen", tmp_path / "caches"
    assert main(["train", "--preset", "latent-diffusion", "--data", "shapes:16", "--autoencoder",
                 f"own:{models / 'ae'}", "--data_size", "24", "--cache_dir", str(cache_dir), "--out", str(out),
                 "--n_channels_unet", "8", "--ch_mults", "1,2", "--is_attn", "0,0", "--batch_size", "4",
                 "--n_cond_channels", "8", "--n_batches", "2", "--save_models_every", "2", "--no_progress"]) == 0
    caches = list(cache_dir.glob("latents-*"))
    assert len(caches) == 1 and len(LatentCache(caches[0])) == 24
    assert json.loads((out / "config.json").read_text())["latent_factor"] == 2


@pytest.mark.parametrize("extra, expected", [
    (["--autoencoder", "pixels"], "was encoded with --autoencoder"),
    (["--img_size", "32"], "holds 16px images"),
    (["--flip", "true"], "no flipped latents"),
])
def test_flags_that_contradict_the_cache_are_refused(models, tmp_path, capsys, extra, expected):
    code = main(["train", "--preset", "cclddg", "--data", str(models / "cache"), "--out", str(tmp_path / "r"),
                 *TINY_GEN, *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and expected in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_latent_presets_need_a_latent_space():
    with pytest.raises(UserError, match="trains in a latent space"):
        resolve("cclddg", {"encoder": "cloob-tiny:x"})
    with pytest.raises(UserError, match="trains in a latent space"):
        resolve("latent-diffusion", {})


def test_incomplete_cache_is_refused(models, tmp_path, capsys):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "progress.json").write_text(json.dumps({"limit": 40, "shard_size": 20}))
    code = main(["train", "--preset", "cclddg", "--data", str(partial), "--out", str(tmp_path / "r"), *TINY_GEN])
    err = capsys.readouterr().err
    assert code == 2 and "is incomplete (0 of 2 shards)" in err


def test_resuming_with_another_cache_is_refused(models, tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(["train", "--preset", "cclddg", "--data", str(models / "cache"), "--out", str(out), *TINY_GEN]) == 0
    other = tmp_path / "other"
    assert main(["encode", "--data", "shapes:16", "--n", "8", "--autoencoder", "pixels", "--encoder",
                 json.loads((out / "config.json").read_text())["encoder"], "--out", str(other), "--no_progress"]) == 0
    capsys.readouterr()
    code = main(["train", "--out", str(out), "--resume", "--data", str(other), "--n_batches", "6", "--no_progress"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot resume" in err
