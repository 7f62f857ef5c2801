"""The encode-once latent cache: what it stores equals what the models give, resume is exact, damaged or
foreign folders are refused with one clear line, and `cclddg encode` works end to end."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from cclddg.cli import main
from cclddg.data.latent_cache import LatentCache, encode_batch, encode_dataset
from cclddg.data.sources import ShapesSource, open_dataset
from cclddg.encoders import load_embedder, weights_fingerprint
from cclddg.errors import UserError
from cclddg.latents import PixelSpace
from tiny import CLOOB, with_flags

SIZE, COUNT, DATA = 16, 20, "shapes:16"
FP16 = dict(atol=3e-3, rtol=2e-3)
TINY_CLOOB = with_flags(CLOOB, "--text_tower", "bpe", "--train_size", "128", "--batch_size", "32",
                        "--img_size", str(SIZE), "--save_every", "4", "--log_every", "4", "--warmup", "1")


class StopAfter:
    """A real source wrapper that raises (like Ctrl-C) when asked for its `records + 1`-th record."""

    def __init__(self, source, records: int, error: type[BaseException] = KeyboardInterrupt) -> None:
        self.source, self.records, self.error = source, records, error

    def __len__(self) -> int:
        return len(self.source)

    def describe(self) -> str:
        return self.source.describe()

    def record(self, index):
        if self.records <= 0:
            raise self.error()
        self.records -= 1
        return self.source.record(index)


def shapes(count: int = COUNT):
    return ShapesSource(SIZE, count, seed=0)


def shapes_batch(count: int = COUNT):
    return open_dataset(DATA, SIZE, seed=0, length=count).get_batch(range(count))


@pytest.fixture(scope="module")
def cloob(tmp_path_factory):
    out = tmp_path_factory.mktemp("cloob") / "run"
    assert main(["train-cloob", "--out", str(out), *TINY_CLOOB]) == 0
    return load_embedder(f"cloob-tiny:{out}")


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    from diffusers import AutoencoderKL

    from cclddg.latents.vae import DiffusersVAE

    torch.manual_seed(0)
    model = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                          layers_per_block=1)
    folder = tmp_path_factory.mktemp("vae") / "tiny-vae"
    model.save_pretrained(folder)
    space = DiffusersVAE(model)
    space.spec, space.fingerprint = f"kl-f8:{folder}", weights_fingerprint(folder)
    return space


@pytest.fixture(scope="module")
def vae_cache(tmp_path_factory, vae, cloob):
    out = tmp_path_factory.mktemp("caches") / "vae"
    encode_dataset(shapes(), DATA, 0, COUNT, SIZE, vae, cloob, out, flip=True, shard_size=8, batch_size=3,
                   progress=False)
    return out


def test_cache_holds_what_encode_batch_gives(vae_cache, vae, cloob):
    cache = LatentCache(vae_cache, autoencoder=vae.spec, encoder=cloob.spec)
    meta = json.loads((vae_cache / "cache.json").read_text())
    assert [s["count"] for s in meta["shards"]] == [8, 8, 4] and len(cache) == COUNT
    assert (cache.channels, cache.latent_size, cache.img_size, cache.embed_dim) == (4, 8, SIZE, 16)
    assert cache.has_flip and cache.has_labels and not (vae_cache / "progress.json").exists()
    assert np.load(vae_cache / "shard_00001" / "latents.npy").dtype == np.float16

    images, labels, captions = shapes_batch()
    want = encode_batch(images, captions, vae.with_scale(cache.scale), cloob, flip=True)
    assert vae.scale == 1.0  # with_scale made a new space
    assert set(want) == {"latents", "latents_flip", "image_emb", "image_emb_flip", "text_emb"}
    got = cache.get_batch(range(COUNT))
    assert got["captions"] == captions
    torch.testing.assert_close(got["labels"], labels.float())
    for name in ("latents", "image_emb", "text_emb"):
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], want[name], **FP16)
    flipped = cache.get_batch(range(COUNT), flip=torch.ones(COUNT, dtype=torch.bool))
    torch.testing.assert_close(flipped["latents"], want["latents_flip"], **FP16)
    torch.testing.assert_close(flipped["image_emb"], want["image_emb_flip"], **FP16)
    torch.testing.assert_close(flipped["text_emb"], got["text_emb"])  # a caption does not flip
    assert (flipped["latents"] - got["latents"]).abs().max() > 0.01  # shapes are rarely symmetric

    # any order, repeats, across shards, a per-example flip mask
    idx = [19, 0, 8, 7, 8, 15, 3]
    mask = torch.tensor([True, False, True, False, False, True, True])
    mixed = cache.get_batch(idx, flip=mask)
    assert mixed["captions"] == [captions[i] for i in idx]
    for j, i in enumerate(idx):
        source = flipped if mask[j] else got
        torch.testing.assert_close(mixed["latents"][j], source["latents"][i], atol=0, rtol=0)
        torch.testing.assert_close(mixed["image_emb"][j], source["image_emb"][i], atol=0, rtol=0)
        torch.testing.assert_close(mixed["text_emb"][j], got["text_emb"][i], atol=0, rtol=0)
    assert cache.verify() == meta["content_hash"]


def test_measured_scale_gives_unit_variance_and_pixels_keep_their_range(vae_cache, tmp_path):
    cache = LatentCache(vae_cache)
    assert cache.get_batch(range(COUNT))["latents"].std().item() == pytest.approx(1.0, abs=0.01)
    assert cache.scale != pytest.approx(1.0, abs=0.05)  # a random VAE's raw latents are not unit-variance

    encode_dataset(shapes(), DATA, 0, COUNT, SIZE, PixelSpace(), None, tmp_path / "px", shard_size=8, progress=False)
    pixels = LatentCache(tmp_path / "px", autoencoder="pixels")
    images = shapes_batch()[0]
    assert pixels.scale == 1.0  # pixel space keeps images in [-1, 1], as pixel runs without a cache see them
    assert pixels.embed_dim == 0 and pixels.encoder is None and "image_emb" not in pixels.get_batch([0])
    torch.testing.assert_close(pixels.get_batch(range(COUNT))["latents"], images * pixels.scale, **FP16)
    assert not (tmp_path / "px" / "shard_00000" / "latents_flip.npy").exists()
    with pytest.raises(UserError, match="encode it with --flip"):
        pixels.get_batch([0], flip=torch.tensor([True]))


def test_flip_latents_are_the_latents_of_flipped_images(tmp_path):
    encode_dataset(shapes(), DATA, 0, COUNT, SIZE, PixelSpace(), None, tmp_path / "c", flip=True, shard_size=8,
                   batch_size=5, scale=0.5, progress=False)
    cache = LatentCache(tmp_path / "c")
    images = shapes_batch()[0]
    assert cache.scale == 0.5  # --scale given: not measured
    flipped = cache.get_batch(range(COUNT), flip=torch.ones(COUNT, dtype=torch.bool))["latents"]
    torch.testing.assert_close(flipped, images.flip(-1) * 0.5, **FP16)


def test_interrupted_encode_resumes_to_the_same_content(tmp_path, vae, cloob):
    args = dict(data_spec=DATA, seed=0, count=COUNT, img_size=SIZE, space=vae, embedder=cloob, flip=True,
                shard_size=8, batch_size=4, progress=False)
    straight = encode_dataset(shapes(), out=tmp_path / "straight", **args)
    out = tmp_path / "split"
    # 20 records measure the scale; records are read 16 at a time, so the first 16 fill shards 0 and 1 and
    # Ctrl-C comes while shard 2 waits for record 16
    with pytest.raises(KeyboardInterrupt):
        encode_dataset(StopAfter(shapes(), 20 + 16), out=out, **args)
    assert sorted(p.name for p in out.iterdir()) == ["progress.json", "shard_00000", "shard_00001"]
    with pytest.raises(UserError, match=r"incomplete \(2 of 3 shards\); run the same `cclddg encode`"):
        LatentCache(out)
    # a killed run's leftover temporary shard (complete-looking files) is not a finished shard
    shutil.copytree(out / "shard_00000", out / ".tmp-shard_00002")
    with pytest.raises(UserError, match=r"2 of 3 shards"):
        LatentCache(out)
    with pytest.raises(RuntimeError):  # another interruption, no shard finished
        encode_dataset(StopAfter(shapes(), 1, RuntimeError), out=out, **args)
    assert not (out / ".tmp-shard_00002").exists() and not (out / "shard_00002").exists()
    encode_dataset(shapes(), out=out, **args)
    a, b = LatentCache(straight), LatentCache(out)
    assert a.content_hash == b.content_hash and a.meta == b.meta
    assert b.verify() == a.content_hash


def test_resume_keeps_the_scale_of_the_first_run(tmp_path):
    out = tmp_path / "c"
    args = dict(data_spec=DATA, seed=0, count=COUNT, img_size=SIZE, space=PixelSpace(), embedder=None,
                out=out, shard_size=8, batch_size=8, progress=False)
    with pytest.raises(KeyboardInterrupt):
        encode_dataset(StopAfter(shapes(), 1), scale=0.25, **args)
    assert json.loads((out / "progress.json").read_text())["scale"] == 0.25
    with pytest.raises(UserError, match="not --scale 0.5"):
        encode_dataset(shapes(), scale=0.5, **args)
    encode_dataset(shapes(), **args)  # no --scale: the partial cache's own, not a new measurement
    cache = LatentCache(out)
    assert cache.scale == 0.25
    torch.testing.assert_close(cache.get_batch(range(COUNT))["latents"], shapes_batch()[0] / 4,
                               **FP16)


def test_complete_foreign_and_mismatched_folders(vae_cache, tmp_path, vae, cloob):
    before = (vae_cache / "cache.json").read_bytes()
    args = dict(data_spec=DATA, seed=0, count=COUNT, img_size=SIZE, space=vae, embedder=cloob, out=vae_cache,
                flip=True, shard_size=8, batch_size=3, progress=False)
    # the same key: already complete, the dataset is never read
    assert encode_dataset(StopAfter(shapes(), 0, RuntimeError), **args) == vae_cache
    assert (vae_cache / "cache.json").read_bytes() == before
    for change in (dict(count=COUNT - 1), dict(space=PixelSpace()), dict(embedder=None), dict(seed=1)):
        with pytest.raises(UserError, match="holds a cache of .*; choose a new --out"):
            encode_dataset(StopAfter(shapes(), 0, RuntimeError), **{**args, **change})
    assert (vae_cache / "cache.json").read_bytes() == before
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    with pytest.raises(UserError, match="is not empty and holds no latent cache"):
        encode_dataset(shapes(), **{**args, "out": foreign})
    assert sorted(p.name for p in foreign.iterdir()) == ["todo.txt"]
    with pytest.raises(UserError, match=r"not a latent cache \(no cache.json\); make one with cclddg encode"):
        LatentCache(foreign)


def test_opening_checks_models_and_shards(vae_cache, tmp_path, vae, cloob):
    with pytest.raises(UserError, match=r"encoded with --autoencoder kl-f8:/.*tiny-vae, not pixels"):
        LatentCache(vae_cache, autoencoder="pixels")
    other = tmp_path / "other-cloob"
    with pytest.raises(UserError, match=rf"encoded with --encoder cloob-tiny:/.*, not cloob-tiny:{other}"):
        LatentCache(vae_cache, encoder=f"cloob-tiny:{other}")
    LatentCache(vae_cache, autoencoder=vae.spec, encoder=cloob.spec)  # the same models: fine

    broken = tmp_path / "broken"
    shutil.copytree(vae_cache, broken)
    shutil.rmtree(broken / "shard_00002")
    with pytest.raises(UserError, match="shard_00002 is missing"):
        LatentCache(broken)
    shutil.copytree(vae_cache / "shard_00001", broken / "shard_00002")  # 8 examples where 4 belong
    with pytest.raises(UserError, match=r"shape \(8, 4, 8, 8\), expected \(4, 4, 8, 8\)"):
        LatentCache(broken)


def test_verify_catches_a_corrupted_shard(vae_cache, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(vae_cache, copy)
    cache = LatentCache(copy)
    assert cache.verify() == cache.content_hash
    path = copy / "shard_00001" / "text_emb.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # one bit of one embedding: shapes and headers still fine
    path.write_bytes(bytes(data))
    damaged = LatentCache(copy)  # it still opens
    with pytest.raises(UserError, match="shard_00001 does not match its recorded hash"):
        damaged.verify()


def test_cli_encodes_end_to_end(tmp_path, cloob, capsys):
    out = tmp_path / "cache"
    argv = ["encode", "--data", DATA, "--n", "12", "--seed", "3", "--autoencoder", "pixels", "--encoder", cloob.spec,
            "--out", str(out), "--flip", "--shard_size", "5", "--batch_size", "4", "--threads", "1", "--no_progress"]
    assert main(argv) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"encoded 12 examples into {out}: latents (3, 16, 16)") and "3 shards" in line
    cache = LatentCache(out, autoencoder="pixels", encoder=cloob.spec)
    assert len(cache) == 12 and cache.has_flip and cache.meta["seed"] == 3 and cache.embed_dim == 16
    assert cache.get_batch([11])["captions"] == open_dataset(DATA, SIZE, seed=3, length=12).get_batch([11])[2]
    assert main(argv) == 0
    assert "already complete" in capsys.readouterr().out
    assert main([*argv, "--n", "13"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "choose a new --out" in err and "limit differ" in err


@pytest.mark.parametrize("argv, expected", [
    (["--n", "0"], "--n must be >= 1"),
    (["--shard_size", "-1"], "--shard_size must be in [1, 10000000]"),
    (["--autoencoder", "vae"], "--autoencoder 'vae' is not valid"),
    (["--encoder", "clip:x"], "--encoder 'clip:x' is not valid"),
    (["--data", "imagenet"], "unknown data source 'imagenet'"),
    (["--scale", "0"], "--scale must be in (0, 1000]"),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, argv, expected):
    out = tmp_path / "c"
    base = ["encode", "--n", "4", "--autoencoder", "pixels", "--out", str(out), "--no_progress"]
    assert main([*base, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not out.exists()


@pytest.mark.parametrize("argv, expected", [
    (["--n", "4", "--autoencoder", "pixels"], "the following arguments are required: --out"),
    (["--n", "four", "--autoencoder", "pixels", "--out", "x"], "--n expected an integer, got 'four'"),
])
def test_cli_usage_errors_exit_2(capsys, argv, expected):
    code = main(["encode", *argv])  # argparse's refusals too: main returns the code, it does not exit
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expected in err


def _images(folder, start: int, count: int) -> None:
    from PIL import Image

    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(start, start + count):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


@pytest.mark.parametrize("change", ["added", "rewritten", "removed"])
def test_a_folder_cache_refuses_a_folder_that_changed(tmp_path, capsys, change):
    """The cache of 4 images is not served for a folder of 12 (or with one image rewritten, or removed): one
    line names the change and how to encode again; the same folder unchanged is reused."""
    images, cache = tmp_path / "images", tmp_path / "cache"
    _images(images, 0, 4)
    command = ["encode", "--data", f"folder:{images}", "--autoencoder", "pixels", "--img_size", "16",
               "--out", str(cache), "--no_progress"]
    assert main(command) == 0
    assert main(command) == 0 and "already complete" in capsys.readouterr().out
    if change == "added":
        _images(images, 4, 8)
    elif change == "rewritten":
        _images(images, 100, 1)
        shutil.move(images / "100.png", images / "002.png")
    else:
        (images / "003.png").unlink()
    assert main(command) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "changed since the cache" in err[0] and f"rm -r {cache}" in err[0], err
    if change == "added":
        assert "12 files" in err[0] and "4 files" in err[0]


def test_a_training_runs_automatic_cache_refuses_a_folder_that_changed(tmp_path, capsys):
    images = tmp_path / "images"
    _images(images, 0, 4)
    train = ["train", "--data", f"folder:{images}", "--cond", "none", "--img_size", "16", "--n_channels_unet", "8",
             "--ch_mults", "1,2", "--is_attn", "0,0", "--n_channels_disc", "8", "--ch_mults_disc", "1,2",
             "--is_attn_disc", "0,0", "--batch_size", "2", "--z_dim", "4", "--n_batches", "1", "--no_progress",
             "--cache_dir", str(tmp_path / "caches")]  # a pixel run on real images trains from a cache too
    assert main([*train, "--out", str(tmp_path / "a")]) == 0
    _images(images, 4, 8)
    capsys.readouterr()
    assert main([*train, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "changed since the cache" in err[0], err
