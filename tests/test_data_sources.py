"""Real data sources on data the tests write to disk: folders with the three caption layouts, a saved
Hugging Face dataset, webdataset shards; every bad-file kind in one folder with exact counts; disjoint
sharding across ranks and workers; clear one-line errors; and the commands that consume them."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from cclddg.cli import main
from cclddg.data.preprocess import BadDataWarning, SkipLog
from cclddg.data.sources import open_source, parse_data_spec
from cclddg.data.stream import iter_batches, iter_examples
from cclddg.errors import UserError

COLORS = [(230, 30, 30), (30, 200, 40), (30, 60, 230), (240, 220, 30), (150, 50, 200), (250, 140, 20)]


def png_bytes(color, size=(48, 40), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def mean_color(example) -> tuple[int, ...]:
    return tuple(int(v) for v in example.image.float().mean((1, 2)).round())


def close(a, b, tol=6) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def examples(spec, size=16, **options):
    skips = SkipLog(warn=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadDataWarning)
        found = list(iter_examples(open_source(spec, size), size, skips=skips, **options))
    return found, skips


# ---- folders ----------------------------------------------------------------------------------------
def test_folder_caption_layouts(tmp_path):
    (tmp_path / "txt").mkdir()
    for i, ext in enumerate(["png", "jpg", "webp", "bmp", "gif"]):
        (tmp_path / "txt" / f"im{i}.{ext}").write_bytes(png_bytes(COLORS[i], fmt={"jpg": "JPEG"}.get(ext, ext.upper())))
        (tmp_path / "txt" / f"im{i}.txt").write_text(f"  colour {i}\n")
    jsonl = tmp_path / "jsonl" / "sub"
    jsonl.mkdir(parents=True)
    (jsonl / "a.png").write_bytes(png_bytes(COLORS[0]))
    (jsonl / "b.png").write_bytes(png_bytes(COLORS[1]))
    (tmp_path / "jsonl" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "sub/a.png", "text": "a red one"}) + "\n" + json.dumps({"file_name": "sub/b.png", "text": "ünïcode green"}) + "\n")
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "x.png").write_bytes(png_bytes(COLORS[2]))
    (tmp_path / "csv" / "y.png").write_bytes(png_bytes(COLORS[3]))
    (tmp_path / "csv" / "metadata.csv").write_text('file_name,text\nx.png,"blue, with a comma"\n')
    (tmp_path / "csv" / ".hidden.png").write_bytes(png_bytes(COLORS[4]))

    found, skips = examples(f"folder:{tmp_path / 'txt'}")
    assert [e.caption for e in found] == [f"colour {i}" for i in range(5)] and skips.skipped == 0
    for e, color in zip(found, COLORS):
        assert e.image.shape == (3, 16, 16) and e.image.dtype == torch.uint8
        assert close(mean_color(e), color, tol=8 if e.caption == "colour 1" else 1)  # jpg is lossy
    found, _ = examples(f"folder:{tmp_path / 'jsonl'}")
    assert [e.caption for e in found] == ["a red one", "ünïcode green"]
    found, _ = examples(f"folder:{tmp_path / 'csv'}")  # y.png has no row: the empty caption; .hidden ignored
    assert [e.caption for e in found] == ["blue, with a comma", ""]
    assert close(mean_color(found[0]), COLORS[2], 1) and close(mean_color(found[1]), COLORS[3], 1)


def make_bad_folder(root):
    """6 good images and one file of every bad kind the sources must survive."""
    root.mkdir()
    for i, color in enumerate(COLORS):
        (root / f"good{i}.png").write_bytes(png_bytes(color))
        (root / f"good{i}.txt").write_text(f"good {i}")
    (root / "empty.png").write_bytes(b"")
    whole = png_bytes(COLORS[0], size=(64, 64))
    noisy = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(noisy, "PNG")
    (root / "truncated.png").write_bytes(noisy.getvalue()[: len(noisy.getvalue()) // 2])
    (root / "text.jpg").write_bytes(b"this is not an image at all" * 10)
    bomb = io.BytesIO()
    Image.new("1", (10000, 10000)).save(bomb, "PNG")  # 100 M pixels in a few KB
    (root / "bomb.png").write_bytes(bomb.getvalue())
    (root / "latin1.png").write_bytes(whole)
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    return root


def test_every_bad_file_kind_is_skipped_and_counted(tmp_path):
    root = make_bad_folder(tmp_path / "bad")
    skips = SkipLog()
    with pytest.warns(BadDataWarning) as caught:
        found = list(iter_examples(open_source(f"folder:{root}", 16), 16, skips=skips))
    assert sorted(e.caption for e in found) == [f"good {i}" for i in range(6)]
    assert skips.good == 6 and skips.skipped == 5
    assert dict(skips.counts) == {"empty file": 1, "truncated image": 1, "not an image": 1, "too many pixels": 1,
                                  "caption not UTF-8": 1}
    assert len([w for w in caught if issubclass(w.category, BadDataWarning)]) == 5  # the first few, named
    assert "skipped 5 bad example(s) of 11 read" in skips.summary()
    by_name = {e.caption: mean_color(e) for e in found}
    assert all(close(by_name[f"good {i}"], c, 1) for i, c in enumerate(COLORS))


def test_a_source_with_no_usable_image_fails_at_once(tmp_path):
    root = tmp_path / "allbad"
    root.mkdir()
    (root / "a.png").write_bytes(b"")
    (root / "b.jpg").write_bytes(b"nope")
    with pytest.raises(UserError, match=r"no usable image in folder .*: skipped 2 bad example\(s\) of 2 read"):
        examples(f"folder:{root}")
    with pytest.raises(UserError, match="does not exist"):
        open_source(f"folder:{tmp_path / 'missing'}")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hi")
    with pytest.raises(UserError, match="no image files"):
        open_source(f"folder:{tmp_path / 'notes'}")
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "a.png").write_bytes(png_bytes(COLORS[0]))
    (tmp_path / "meta" / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{broken\n')
    with pytest.raises(UserError, match="line 2 is not JSON"):
        open_source(f"folder:{tmp_path / 'meta'}")


def test_specs_parse_and_refuse_with_examples(tmp_path):
    assert parse_data_spec("shapes:64").size == 64 and parse_data_spec("shapes").procedural
    assert parse_data_spec("hf:some/name:validation").split == "validation"
    assert parse_data_spec(f"hf:{tmp_path}").arg == str(tmp_path)
    celeb = parse_data_spec("celebA")
    assert (celeb.kind, celeb.arg, celeb.alias) == ("hf", "huggan/CelebA-faces", "celeba")
    assert parse_data_spec("imagewoof:/data/woof").arg == "/data/woof"
    assert parse_data_spec("cc12m").arg.endswith("{00000..01200}.tar")
    with pytest.raises(UserError, match="needs a value after ':', e.g. folder:"):
        parse_data_spec("folder")
    with pytest.raises(UserError, match="unknown data source 'imagenet'"):
        parse_data_spec("imagenet")
    with pytest.raises(UserError, match=f"for a folder of images use folder:{tmp_path}"):
        parse_data_spec(str(tmp_path))


# ---- Hugging Face -----------------------------------------------------------------------------------
def test_hf_saved_dataset_local_folder_aliases_and_offline_hub(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    images = [{"bytes": png_bytes(c), "path": None} for c in COLORS[:4]] + [{"bytes": b"broken", "path": None}]
    table = datasets.Dataset.from_dict(
        {"image": images, "text": ["r", "g", "b", "y", "bad"], "label": [0, 2, 9, 4, 1]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                    "label": datasets.Value("int64")}))
    datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(str(tmp_path / "saved"))
    found, skips = examples(f"hf:{tmp_path / 'saved'}")
    assert [e.caption for e in found] == ["r", "g", "b", "y"] and dict(skips.counts) == {"not an image": 1}
    assert all(close(mean_color(e), c, 1) for e, c in zip(found, COLORS))
    assert [e.caption for e in examples(f"hf:{tmp_path / 'saved'}:test")[0]] == ["r"]
    woof, _ = examples(f"imagewoof:{tmp_path / 'saved'}")  # the seed's breed captions from the label
    assert [e.caption for e in woof] == ["A photo of a Shih-Tzu", "A photo of a Beagle", "A photo of a Dingo",
                                         "A photo of a Border terrier"]
    assert {e.caption for e in examples(f"celebA:{tmp_path / 'saved'}")[0]} == {"A photo of a face"}
    with pytest.raises(UserError, match="has no split 'valid'; it has train, test"):
        open_source(f"hf:{tmp_path / 'saved'}:valid")
    # a plain image folder loads through datasets' imagefolder, offline
    folder = tmp_path / "imagefolder"
    folder.mkdir()
    for i, c in enumerate(COLORS[:3]):
        (folder / f"{i}.png").write_bytes(png_bytes(c))
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": f"t{i}"}) + "\n"
                                                   for i in range(3)))
    assert sorted(e.caption for e in examples(f"hf:{folder}")[0]) == ["t0", "t1", "t2"]
    with pytest.raises(UserError, match=r"is a hub dataset and this machine is offline .*save_to_disk"):
        open_source("celebA")


# ---- webdataset -------------------------------------------------------------------------------------
def write_shards(root, n_shards=3, per_shard=4, bad=False):
    import webdataset

    root.mkdir()
    k = 0
    for s in range(n_shards):
        with webdataset.TarWriter(str(root / f"{s:03d}.tar")) as sink:
            for _ in range(per_shard):
                sink.write({"__key__": f"{k:05d}", "png": png_bytes(COLORS[k % 6]), "txt": f"caption {k}"})
                k += 1
            if bad and s == 1:
                sink.write({"__key__": "notimg", "jpg": b"garbage", "txt": "x"})
                sink.write({"__key__": "latin", "png": png_bytes(COLORS[0]), "txt": "caf\xe9".encode("latin-1")})
    return k


def test_webdataset_shards_with_bad_members(tmp_path):
    n = write_shards(tmp_path / "shards", bad=True)
    spec = f"wds:{tmp_path / 'shards'}/{{000..002}}.tar"
    found, skips = examples(spec)
    assert [e.caption for e in found] == [f"caption {k}" for k in range(n)]
    assert all(close(mean_color(e), COLORS[k % 6], 1) for k, e in enumerate(found))
    assert dict(skips.counts) == {"not an image": 1, "caption not UTF-8": 1}
    # a truncated last shard: its good samples, one counted error, no crash
    data = (tmp_path / "shards" / "002.tar").read_bytes()
    (tmp_path / "shards" / "002.tar").write_bytes(data[: len(data) // 2])
    found, skips = examples(spec)
    assert 8 <= len(found) < n and skips.counts["unreadable"] == 1


# ---- sharding across ranks and workers --------------------------------------------------------------
@pytest.mark.parametrize("kind", ["folder", "hf", "wds"])
def test_ranks_and_workers_see_disjoint_parts_that_cover_the_source(tmp_path, kind):
    import datasets

    n = 13
    if kind == "wds":
        write_shards(tmp_path / "d", n_shards=5, per_shard=3)  # 15 samples, 5 shards
        n, spec = 15, f"wds:{tmp_path / 'd'}/{{000..004}}.tar"
    elif kind == "folder":
        (tmp_path / "d").mkdir()
        for i in range(n):
            (tmp_path / "d" / f"{i:02d}.png").write_bytes(png_bytes(COLORS[i % 6]))
            (tmp_path / "d" / f"{i:02d}.txt").write_text(f"caption {i}")
        spec = f"folder:{tmp_path / 'd'}"
    else:
        datasets.Dataset.from_dict({"image": [{"bytes": png_bytes(COLORS[i % 6]), "path": None} for i in range(n)],
                                    "text": [f"caption {i}" for i in range(n)]},
                                   features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
                                   ).save_to_disk(str(tmp_path / "d"))
        spec = f"hf:{tmp_path / 'd'}"
    source = open_source(spec, 16)
    seen = []
    for rank in range(2):
        part = [e.caption for e in iter_examples(source, 16, workers=2, rank=rank, world_size=2, chunk=2)]
        assert part, f"rank {rank} got nothing"
        seen.append(part)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(f"caption {i}" for i in range(n))
    # one rank, any number of workers: the same examples in the same order (map sources: index order)
    one = [e.caption for e in iter_examples(source, 16, workers=0)]
    two = [e.caption for e in iter_examples(source, 16, workers=2, chunk=2)]
    assert sorted(one) == sorted(two) and (kind == "wds" or one == two)


def test_shuffle_and_random_crop_are_seeded(tmp_path):
    (tmp_path / "d").mkdir()
    for i in range(20):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(tmp_path / "d" / f"{i:02d}.png")
        (tmp_path / "d" / f"{i:02d}.txt").write_text(str(i))
    source = open_source(f"folder:{tmp_path / 'd'}")

    def run(**kw):
        return list(iter_batches(source, 16, 20, shuffle=True, crop="random", flip=True, **kw))[0]

    a, b, c = run(seed=1), run(seed=1), run(seed=2)
    assert a.captions == b.captions and torch.equal(a.images, b.images)
    assert a.captions != c.captions and sorted(a.captions) == sorted(c.captions)
    assert a.captions != [str(i) for i in range(20)]
    assert a.images.shape == (20, 3, 16, 16) and a.images.min() >= -1 and a.images.max() <= 1


# ---- the commands -----------------------------------------------------------------------------------
@pytest.mark.parametrize("shard_size", [4, 6])  # 6: the last three (bad) files come after a full shard
def test_encode_a_folder_with_bad_files_records_them_in_the_cache(tmp_path, capsys, shard_size):
    root = make_bad_folder(tmp_path / "bad")
    out = tmp_path / "cache"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadDataWarning)
        assert main(["encode", "--data", f"folder:{root}", "--autoencoder", "pixels", "--img_size", "16",
                     "--out", str(out), "--shard_size", str(shard_size), "--no_progress", "--workers", "2"]) == 0
    text = capsys.readouterr().out
    assert "encoded 6 examples" in text and "skipped 5 bad example(s) of 11" in text
    meta = json.loads((out / "cache.json").read_text())
    assert meta["count"] == 6 and [s["count"] for s in meta["shards"]] == ([4, 2] if shard_size == 4 else [6])
    assert meta["skipped"]["skipped"] == 5 and meta["skipped"]["by_kind"]["too many pixels"] == 1
    from cclddg.data.latent_cache import LatentCache

    cache = LatentCache(out)
    got = cache.get_batch(range(6))
    assert sorted(got["captions"]) == [f"good {i}" for i in range(6)]
    assert got["latents"].shape == (6, 3, 16, 16)


def test_train_on_a_folder_encodes_it_once_and_trains(tmp_path, capsys):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(24):
        (root / f"{i:02d}.png").write_bytes(png_bytes(COLORS[i % 6], size=(20, 16)))
    run = tmp_path / "run"
    args = ["train", "--preset", "fast", "--data", f"folder:{root}", "--cond", "none", "--img_size", "16",
            "--n_batches", "2", "--batch_size", "8", "--out", str(run), "--cache_dir", str(tmp_path / "caches"),
            "--log_images_every", "100", "--save_models_every", "100", "--no_progress", "--wandb_project", "None"]
    assert main(args) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data_size"] == 24 and cfg["latent_scale"] == 1.0
    caches = list((tmp_path / "caches").glob("latents-*"))
    assert len(caches) == 1 and json.loads((caches[0] / "cache.json").read_text())["count"] == 24
    assert main([*args[:5], "--out", str(tmp_path / "labels")]) == 2  # --cond labels (the preset's)
    err = capsys.readouterr().err
    assert "has no class labels" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "labels").exists()


def test_small_trainers_read_a_folder_with_a_held_out_part(tmp_path):
    from cclddg.data.sources import load_held_out, load_training_set

    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(30):
        (root / f"{i:02d}.png").write_bytes(png_bytes(COLORS[i % 6]))
        (root / f"{i:02d}.txt").write_text(f"caption {i}")
    spec = f"folder:{root}"
    train, train_caps = load_training_set(spec, 16, 0, 100, 10, workers=0)
    held, held_caps = load_held_out(spec, 16, 10, 0, workers=0)
    assert len(train) == 20 and len(held) == 10 and not set(train_caps) & set(held_caps)
    assert sorted(train_caps + held_caps) == sorted(f"caption {i}" for i in range(30))
    out = tmp_path / "ae"
    assert main(["train-ae", "--data", spec, "--img_size", "16", "--crop", "0", "--widths", "8,16",
                 "--norm_groups", "4", "--n_batches", "2", "--batch_size", "4", "--eval_size", "5",
                 "--out", str(out), "--no_progress"]) == 0
    assert json.loads((out / "report.json").read_text())["psnr_held_out"] > 0


class StopAfterRecords:
    """A real stream source that raises like Ctrl-C after `n` records: an interrupted encode."""

    def __init__(self, source, n: int) -> None:
        self.source, self.n, self.shards = source, n, source.shards

    def describe(self) -> str:
        return self.source.describe()

    def records(self, shards):
        for k, record in enumerate(self.source.records(shards)):
            if k == self.n:
                raise KeyboardInterrupt
            yield record


def test_interrupted_webdataset_encode_resumes_to_the_same_content(tmp_path):
    from cclddg.data.latent_cache import LatentCache, encode_dataset
    from cclddg.latents import PixelSpace

    write_shards(tmp_path / "shards", n_shards=5, bad=True)  # 20 good samples + 2 bad ones in shard 1
    spec = f"wds:{tmp_path / 'shards'}/{{000..004}}.tar"
    args = dict(data_spec=spec, seed=0, count=None, img_size=16, space=PixelSpace(), embedder=None, shard_size=5,
                batch_size=2, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadDataWarning)
        straight = encode_dataset(open_source(spec), out=tmp_path / "straight", **args)
        # records come 16 at a time: the first 16 (14 good) fill shards 0 and 1, then Ctrl-C
        with pytest.raises(KeyboardInterrupt):
            encode_dataset(StopAfterRecords(open_source(spec), 16), out=tmp_path / "split", **args)
        assert sorted(p.name for p in (tmp_path / "split").glob("shard_*")) == ["shard_00000", "shard_00001"]
        encode_dataset(open_source(spec), out=tmp_path / "split", **args)
    a, b = LatentCache(straight), LatentCache(tmp_path / "split")
    assert a.content_hash == b.content_hash and len(b) == 20
    assert b.meta["skipped"]["by_kind"] == {"not an image": 1, "caption not UTF-8": 1}
    assert b.get_batch(range(20))["captions"] == [f"caption {k}" for k in range(20)]
