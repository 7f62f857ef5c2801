"""Generator training on embeddings (cache, pct_text, which nets see c) and prompted sampling/eval, end to end."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cclddg.cli import main
from cclddg.data.embedding_cache import cache_file, cache_key, dataset_embeddings
from cclddg.data.shapes import ShapesDataset
from cclddg.encoders import load_embedder
from cclddg.model_folder import CCLDDGPipeline
from cclddg.pipeline import PromptPipeline
from cclddg.run_config import resolve
from cclddg.training.trainer import Trainer
from tiny import CLOOB, GEN, with_flags

TINY_CLOOB = with_flags(CLOOB, "--train_size", "128", "--batch_size", "32", "--n_batches", "20")
TINY_GEN = with_flags(GEN, "--cond_map_size", "4", "--data_size", "64", drop=("--n_batches",))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    out = tmp_path_factory.mktemp("enc") / "cloob"
    assert main(["train-cloob", "--out", str(out), *TINY_CLOOB]) == 0
    return f"cloob-tiny:{out}"


@pytest.fixture(scope="module")
def gen_run(tmp_path_factory, encoder):
    root = tmp_path_factory.mktemp("gen")
    out = root / "run"
    assert main(["train", "--out", str(out), *TINY_GEN, "--encoder", encoder, "--pct_text", "0.5",
                 "--cache_dir", str(root / "cache"), "--n_batches", "6", "--save_models_every", "3"]) == 0
    return out


def test_embedding_run_records_its_encoder_and_caches_embeddings_once(gen_run, encoder):
    cfg = json.loads((gen_run / "config.json").read_text())
    assert cfg["cond"] == "embedding" and cfg["encoder"] == encoder and cfg["pct_text"] == 0.5
    caches = list((gen_run.parent / "cache").glob("embeddings-*.safetensors"))
    assert len(caches) == 1
    config = json.loads((gen_run / "checkpoints" / "latest").parent.joinpath("step_0000006", "generator",
                                                                              "config.json").read_text())
    assert config["cond_dim"] == 16
    assert config["cond_scale"] == 4.0  # sqrt(dim): unit embeddings reach the net with unit-variance entries


def test_cache_is_reused_and_keyed_by_the_encoder(tmp_path, encoder):
    emb = load_embedder(encoder)
    data = ShapesDataset(size=16, length=40, seed=3)
    key = cache_key("shapes", 16, 3, 40, encoder, emb.fingerprint)
    first = dataset_embeddings(data, 40, emb, key, tmp_path, progress=False)
    path = cache_file(tmp_path, key)
    stamp = path.stat().st_mtime_ns
    again = dataset_embeddings(data, 40, emb, key, tmp_path, progress=False)
    assert path.stat().st_mtime_ns == stamp  # read, not rebuilt
    torch.testing.assert_close(first["image"], again["image"], atol=0, rtol=0)
    # the cached rows are the embedder's own outputs for those examples
    images, _, captions = data.get_batch(range(5))
    torch.testing.assert_close(first["image"][:5], emb.embed_images(images), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(first["text"][:5], emb.embed_texts(captions), atol=1e-5, rtol=1e-4)
    other = cache_key("shapes", 16, 3, 40, encoder, "another-weights")
    assert cache_file(tmp_path, other) != path
    path.write_bytes(b"damaged")  # a damaged cache is rebuilt, never trusted
    rebuilt = dataset_embeddings(data, 40, emb, key, tmp_path, progress=False)
    torch.testing.assert_close(rebuilt["image"], first["image"], atol=0, rtol=0)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize("pct_text, source", [(0.0, "image"), (1.0, "text")])
def test_pct_text_picks_the_embedding_source(tmp_path, encoder, pct_text, source):
    overrides = dict(img_size=16, n_channels_unet=8, ch_mults=(1, 2), is_attn=(False, False), n_channels_disc=8,
                     ch_mults_disc=(1, 2), is_attn_disc=(False, False), batch_size=8, z_dim=4, n_z_channels=8,
                     n_cond_channels=8, cond_map_size=4, data_size=16, cond="embedding", encoder=encoder,
                     pct_text=pct_text, pct_zeros=0.0, cache_dir=str(tmp_path / "cache"))
    trainer = Trainer(resolve("fast", overrides), tmp_path / "run", progress=False)
    _, cond = trainer.batch(3)  # examples 24..31 wrap to 8..15 of the 16
    expected = trainer.inputs.embeddings[source][8:16]
    torch.testing.assert_close(cond, expected)


def test_use_cloob_flags_choose_which_net_is_conditioned(tmp_path, encoder):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY_GEN, "--encoder", encoder, "--use_cloob_unet", "false",
                 "--cache_dir", str(tmp_path / "cache"), "--n_batches", "2"]) == 0
    ckpt = out / "checkpoints" / "step_0000002"
    assert json.loads((ckpt / "generator" / "config.json").read_text())["cond_dim"] == 0
    assert json.loads((ckpt / "discriminator" / "config.json").read_text())["cond_dim"] == 16
    code = main(["sample", "--checkpoint", str(out), "--prompt", "a red circle", "-o", str(tmp_path / "x.png")])
    assert code == 2 and not (tmp_path / "x.png").exists()


def test_prompt_grid_layout_and_reproducibility(tmp_path, gen_run):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    argv = ["sample", "--checkpoint", str(gen_run), "--prompt", "a red circle", "--prompt", "a blue square at the top",
            "--cfg", "1,2,4", "--n", "2", "--seed", "5"]
    assert main([*argv, "-o", str(a)]) == 0 and main([*argv, "-o", str(b)]) == 0
    grid = Image.open(a)
    # 2 rows (prompts) x 6 columns (3 guidance scales x 2 samples) of 16 px tiles with 2 px padding
    assert grid.size == (6 * 18 + 2, 2 * 18 + 2)
    assert np.array_equal(np.asarray(grid), np.asarray(Image.open(b)))


def test_pipeline_api_negative_prompt_and_image_mixing(gen_run, tmp_path):
    pipe = CCLDDGPipeline.from_run(gen_run)

    def call(**options):
        return pipe(prompt="a red circle", num_images_per_prompt=3, guidance_scale=3.0,
                    generator=torch.Generator().manual_seed(1), **options).images

    images = call()
    assert len(images) == 3 and all(isinstance(i, Image.Image) and i.size == (16, 16) for i in images)
    again = call()
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(images, again))
    negative = call(negative_prompt="a blue square")
    assert not all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(images, negative))
    # mixing: weight 0 is the prompt alone, weight 1 the image alone
    picture = ShapesDataset(size=16, seed=9).get_batch([0])[0][0]
    prompts = pipe.conditioner()
    text_only = prompts(["a red circle"])
    image_only = prompts(images=[picture])
    torch.testing.assert_close(prompts(["a red circle"], [picture], 0.0), text_only)
    torch.testing.assert_close(prompts(["a red circle"], [picture], 1.0), image_only)
    mixed = prompts(["a red circle"], [picture], 0.5)
    torch.testing.assert_close(mixed.norm(dim=-1), torch.ones(1))


def test_prompt_pipeline_is_a_deprecated_way_to_the_same_images(gen_run):
    """The old class warns, and still gives CCLDDGPipeline's images for the same prompt and seed."""
    with pytest.warns(FutureWarning, match="CCLDDGPipeline"):
        old = PromptPipeline.from_run(gen_run)
    got = old("a red circle", n=2, guidance=3.0, seed=4)
    want = CCLDDGPipeline.from_run(gen_run)(prompt="a red circle", num_images_per_prompt=2, guidance_scale=3.0,
                                            generator=torch.Generator().manual_seed(4)).images
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(got, want))


def test_image_prompt_from_a_file(gen_run, tmp_path):
    src = tmp_path / "prompt.png"
    ShapesDataset(size=40, seed=2).sample(0).image.save(src)
    out = tmp_path / "variations.png"
    assert main(["sample", "--checkpoint", str(gen_run), "--image", str(src), "--n", "3", "-o", str(out)]) == 0
    assert Image.open(out).size == (3 * 18 + 2, 18 + 2)


@pytest.mark.parametrize("extra, expected", [
    (["--prompt", "   "], "--prompt is empty"),
    (["--prompt", "a", "--negative_prompt", ""], "--negative_prompt is empty"),
    (["--prompt", "a", "--cfg", "1,2,"], "expected numbers separated by commas"),
    (["--prompt", "red " * 300], "tokens long"),
    (["--image", "missing.png"], "does not exist"),
    (["--prompt", "a", "--image_weight", "2", "--image", "IMG"], "--image_weight must be in [0, 1]"),
    ([], "give --prompt"),
])
def test_prompt_bad_input_is_one_line(gen_run, tmp_path, capsys, extra, expected):
    src = tmp_path / "img.png"
    ShapesDataset(size=16).sample(0).image.save(src)
    extra = [str(src) if e == "IMG" else e for e in extra]
    code = main(["sample", "--checkpoint", str(gen_run), *extra, "-o", str(tmp_path / "o.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and expected in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.png").exists()


def test_unreadable_image_is_one_line(gen_run, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["sample", "--checkpoint", str(gen_run), "--image", str(bad), "-o", str(tmp_path / "o.png")]) == 2
    assert "cannot read image" in capsys.readouterr().err


@pytest.mark.parametrize("prompts", ["text", "image"])
def test_eval_reports_accuracy_and_cloob_score(gen_run, capsys, prompts):
    assert main(["eval", "--checkpoint", str(gen_run), "--n", "8", "--batch_size", "4", "--prompts", prompts,
                 "--cfg", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prompts"] == prompts and report["n"] == 8
    for key in ("color_acc", "shape_acc", "position_acc", "validity"):
        assert 0 <= report[key] <= 1
    assert -1 <= report["cloob_score"] <= 1 and -1 <= report["cloob_score_real"] <= 1


def test_pretrained_cloob_format_conditions_a_generator_end_to_end(tmp_path):
    from test_cloob_pretrained import write_checkpoint

    pkl = tmp_path / "tiny_cloob.pkl"
    write_checkpoint(pkl)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY_GEN, "--encoder", f"cloob-vit-b16:{pkl}",
                 "--cache_dir", str(tmp_path / "cache"), "--n_batches", "2"]) == 0
    assert (tmp_path / "tiny_cloob.safetensors").is_file()  # converted once, beside the pickle
    ckpt = out / "checkpoints" / "step_0000002"
    assert json.loads((ckpt / "generator" / "config.json").read_text())["cond_dim"] == 16
    grid = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(out), "--prompt", "a red circle", "--n", "2", "-o", str(grid)]) == 0
    assert Image.open(grid).size == (2 * 18 + 2, 18 + 2)


def test_refused_out_is_reported_before_the_embedding_cache_is_built(tmp_path, gen_run, encoder, capsys):
    cache = tmp_path / "fresh_cache"
    code = main(["train", "--out", str(gen_run), *TINY_GEN, "--encoder", encoder, "--cache_dir", str(cache)])
    assert code == 2 and "holds another run" in capsys.readouterr().err
    assert not cache.exists()


def test_embedding_run_resumes_exactly(tmp_path, encoder):
    from test_train_cli import _params

    straight, split = tmp_path / "straight", tmp_path / "split"
    common = [*TINY_GEN, "--encoder", encoder, "--pct_text", "0.5", "--cache_dir", str(tmp_path / "cache"),
              "--save_models_every", "3", "--log_images_every", "100"]
    assert main(["train", "--out", str(straight), *common, "--n_batches", "6"]) == 0
    assert main(["train", "--out", str(split), *common, "--n_batches", "3"]) == 0
    assert main(["train", "--out", str(split), *common, "--n_batches", "6", "--resume"]) == 0
    a, b = _params(straight), _params(split)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0


def test_embedding_run_stores_the_text_priors_statistics(gen_run):
    from safetensors.torch import load_file

    from cclddg.priors.stats import load_stats

    stats = load_stats(gen_run)
    (cache,) = (gen_run.parent / "cache").glob("embeddings-*.safetensors")
    embeddings = load_file(str(cache))
    torch.testing.assert_close(stats.image_mean, embeddings["image"].mean(0))
    torch.testing.assert_close(stats.text_mean, embeddings["text"].mean(0))
    assert stats.bank.shape == (64, 16)  # every training example's image embedding (data_size 64)
    torch.testing.assert_close(stats.bank.float(), F.normalize(embeddings["image"], dim=-1).half().float())
    assert stats.inv_temperature > 0  # the posterior prior's, calibrated on the data's captions
    assert load_stats(gen_run / "checkpoints" / "step_0000006").source == stats.source


def test_pseudo_text_perturbs_the_image_embeddings_the_generator_sees(tmp_path, encoder):
    overrides = dict(img_size=16, n_channels_unet=8, ch_mults=(1, 2), is_attn=(False, False), n_channels_disc=8,
                     ch_mults_disc=(1, 2), is_attn_disc=(False, False), batch_size=16, z_dim=4, n_z_channels=8,
                     n_cond_channels=8, cond_map_size=4, data_size=16, cond="embedding", encoder=encoder,
                     pct_text=0.0, pct_zeros=0.0, pseudo_text_xi=1.0, cache_dir=str(tmp_path / "cache"))
    trainer = Trainer(resolve("fast", overrides), tmp_path / "run", progress=False)
    _, cond = trainer.batch(0)
    image = trainer.inputs.embeddings["image"][:16]
    torch.testing.assert_close(cond.norm(dim=-1), torch.ones(16))
    cosine = (cond * image).sum(-1)
    assert cosine.max() < 0.9 and cosine.mean().item() == pytest.approx(2 ** -0.5, abs=0.1)  # 1/sqrt(1 + xi^2)
    _, grid = trainer.batch(0, drop=False)  # grids see the image embeddings as they are
    torch.testing.assert_close(grid, image)


@pytest.mark.parametrize("prior", ["gap", "retrieval", "posterior"])
def test_text_priors_sample_and_evaluate(gen_run, tmp_path, capsys, prior):
    out = tmp_path / f"{prior}.png"
    argv = ["sample", "--checkpoint", str(gen_run), "--prompt", "a red circle", "--prompt", "a crimson disc",
            "--cfg", "1,2", "--n", "2", "--text_prior", prior, "-o", str(out)]
    assert main(argv) == 0 and Image.open(out).size == (4 * 18 + 2, 2 * 18 + 2)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(gen_run), "--n", "8", "--batch_size", "4", "--prompts", "paraphrase",
                 "--text_prior", prior, "--prior_k", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prompts"] == "paraphrase" and report["text_prior"].startswith(prior) and report["n"] == 8


def test_a_run_without_statistics_samples_as_before_and_gets_them_by_command(gen_run, tmp_path, capsys):
    import shutil

    old = tmp_path / "old_run"
    shutil.copytree(gen_run, old)
    (old / "embedding_stats.safetensors").unlink()
    before, after = tmp_path / "before.png", tmp_path / "after.png"
    common = ["sample", "--checkpoint", str(old), "--prompt", "a red circle", "--n", "2"]
    assert main([*common, "-o", str(before)]) == 0  # the run's own prior (none) needs nothing
    capsys.readouterr()
    assert main([*common, "--text_prior", "gap", "-o", str(after)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cclddg embedding-stats {old}" in err and not after.exists()
    assert main(["embedding-stats", str(old), "--n", "32", "--no_progress"]) == 0
    assert (old / "embedding_stats.safetensors").is_file()
    assert main([*common, "--text_prior", "gap", "-o", str(after)]) == 0
    assert main([*common, "-o", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(before)), np.asarray(Image.open(tmp_path / "again.png")))


def test_the_text_prior_may_change_on_resume(tmp_path, encoder):
    out = tmp_path / "run"
    common = [*TINY_GEN, "--encoder", encoder, "--cache_dir", str(tmp_path / "cache")]
    assert main(["train", "--out", str(out), *common, "--n_batches", "2"]) == 0
    assert main(["train", "--out", str(out), *common, "--n_batches", "3", "--resume", "--text_prior", "gap"]) == 0
    assert json.loads((out / "config.json").read_text())["text_prior"] == "gap"  # what the run now uses


@pytest.mark.parametrize("extra, expected", [
    (["--pseudo_text_xi", "-1"], "--pseudo_text_xi must be >= 0"),
    (["--pseudo_text_xi", "nan"], "--pseudo_text_xi must be a finite number"),
    (["--text_prior", "knn"], "invalid choice"),
    (["--prior_k", "0"], "--prior_k must be >= 1"),
])
def test_language_free_flags_bad_input_is_one_line(tmp_path, encoder, capsys, extra, expected):
    try:
        code = main(["train", "--out", str(tmp_path / "run"), *TINY_GEN, "--encoder", encoder, *extra])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and expected in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_train_prior_then_sample_and_measure_variety_with_it(gen_run, tmp_path, capsys):
    """`cclddg train-prior RUN` trains the learned prior into RUN/prior; sampling and eval take --text_prior flow;
    a run without one, or asked to train a second, says in one line what to do."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(gen_run, run)
    common = ["sample", "--checkpoint", str(run), "--prompt", "a red circle", "--n", "2", "--text_prior", "flow"]
    assert main([*common, "-o", str(tmp_path / "none.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cclddg train-prior {run}" in err
    assert main(["train-prior", str(run), "--n_batches", "12", "--width", "32", "--depth", "1", "--batch_size", "16",
                 "--no_progress"]) == 0
    report = json.loads((run / "prior" / "report.json").read_text())
    assert report["step"] == 12 and report["source"] == "captions" and report["pairs"] + report["held_out"] == 64
    assert (run / "prior" / "model" / "diffusion_pytorch_model.safetensors").is_file()
    capsys.readouterr()
    assert main(["train-prior", str(run), "--no_progress"]) == 2
    assert "already has a learned prior" in capsys.readouterr().err
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    assert main([*common, "-o", str(first)]) == 0 and main([*common, "-o", str(second)]) == 0
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))  # seeded: the same draws
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--n", "4", "--text_prior", "flow", "--prior_guidance", "2",
                 "--variety", "--variety_n", "3", "--variety_requests", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["text_prior"] == "flow (captions, guidance 2)"
    variety = report["variety"]
    assert set(variety["groups"]) == {"1", "2", "3"} and variety["n"] == 3
    assert set(variety["groups"]["3"]["open"]) == {"size", "background"}  # colour, shape, position were named
    assert variety["z"]["real"] > 0 and "z_only" in variety["z"]


def test_an_interrupted_prior_is_finished_by_resume(gen_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(gen_run, run)
    args = ["train-prior", str(run), "--width", "16", "--depth", "1", "--batch_size", "8", "--save_every", "5",
            "--no_progress"]
    assert main([*args, "--n_batches", "5"]) == 0
    shutil.rmtree(run / "prior" / "model")  # as if stopped after its checkpoint, before the end
    (run / "prior" / "report.json").unlink()
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(run), "--prompt", "a box", "--text_prior", "flow",
                 "-o", str(tmp_path / "x.png")]) == 2
    assert f"cclddg train-prior {run} --resume" in capsys.readouterr().err
    assert main([*args, "--n_batches", "5"]) == 2  # without --resume: one line
    assert main([*args, "--n_batches", "8", "--resume"]) == 0
    assert json.loads((run / "prior" / "report.json").read_text())["step"] == 8
