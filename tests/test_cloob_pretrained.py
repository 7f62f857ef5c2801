"""The pretrained-CLOOB loader on tiny checkpoints written in the cloob-training pickle format.

The towers are checked against an independent numpy forward pass computed straight from the
pickle's Haiku arrays, including the text tower's query-axis padding mask.
"""

from __future__ import annotations

import collections
import math
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cclddg.encoders.clip_tokenizer import find_vocab
from cclddg.encoders.cloob_pretrained import (
    KNOWN_SHA256,
    VIT_B16,
    CLOOBConfig,
    ImageTowerConfig,
    PretrainedCLOOB,
    TextTowerConfig,
    load_pretrained_cloob,
    sha256_file,
)
from cclddg.encoders.safe_pickle import load_pickle_arrays
from cclddg.errors import UserError

D_EMBED, WIDTH, PATCH, IMAGE, LAYERS, CONTEXT, VOCAB = 16, 32, 8, 32, 2, 77, 49408
SOT, EOT = 49406, 49407
HEADS = {"n_heads_image": 2, "n_heads_text": 2}
MEAN = np.array(VIT_B16.mean).reshape(3, 1, 1)
STD = np.array(VIT_B16.std).reshape(3, 1, 1)


def _has_vocab() -> bool:
    try:
        find_vocab()
        return True
    except UserError:
        return False


needs_vocab = pytest.mark.skipif(not _has_vocab(), reason="the CLIP BPE vocabulary (open-clip-torch) is not installed")


# ---------------------------------------------------------------------------------------------- tiny checkpoints


def haiku_params(seed: int = 0, sep: str = "/~/") -> tuple[dict, dict]:
    """Random (image, text) params with the key paths and array layouts of cloob-training."""
    rng = np.random.default_rng(seed)

    def rand(*shape: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def linear(n_in: int, n_out: int) -> dict:
        return {"w": rand(n_in, n_out, scale=n_in ** -0.5), "b": rand(n_out, scale=0.1)}

    def norm() -> dict:
        return {"scale": 1 + rand(WIDTH, scale=0.1), "offset": rand(WIDTH, scale=0.1)}

    def blocks(root: str) -> dict:
        out = {}
        for i in range(LAYERS):
            att, ff = f"{root}{sep}layer_{i}{sep}self_attention{sep}", f"{root}{sep}layer_{i}{sep}feed_forward{sep}"
            out[att + "layer_norm"] = norm()
            for name in ("query", "key", "value", "linear"):
                out[f"{att}multi_head_attention{sep}{name}"] = linear(WIDTH, WIDTH)
            out[ff + "layer_norm"] = norm()
            out[ff + "linear_0"] = linear(WIDTH, 4 * WIDTH)
            out[ff + "linear_1"] = linear(4 * WIDTH, WIDTH)
        return out

    n_pos = 1 + (IMAGE // PATCH) ** 2
    image = {"vi_t_image_encoder": {"class_embed": rand(WIDTH)},
             f"vi_t_image_encoder{sep}embed": {"w": rand(PATCH, PATCH, 3, WIDTH, scale=0.1)},
             f"vi_t_image_encoder{sep}pos_embed": {"w": rand(n_pos, WIDTH, scale=0.5)},
             f"vi_t_image_encoder{sep}proj": linear(WIDTH, D_EMBED),
             **blocks("vi_t_image_encoder")}
    text = {f"text_encoder{sep}embed": {"embeddings": rand(VOCAB, WIDTH)},
            f"text_encoder{sep}pos_embed": {"w": rand(CONTEXT, WIDTH, scale=0.5)},
            f"text_encoder{sep}proj": linear(WIDTH, D_EMBED),
            **blocks("text_encoder")}
    return image, text


def write_checkpoint(path: Path, seed: int = 0, sep: str = "/~/", **extra: object) -> tuple[dict, dict]:
    params = haiku_params(seed, sep)
    with path.open("wb") as f:
        pickle.dump({"params": params, "epoch": 16, **extra}, f)
    return params


def write_pickle(path: Path, obj: object) -> Path:
    path.write_bytes(pickle.dumps(obj))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[PretrainedCLOOB, tuple[dict, dict]]:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pkl"
    params = write_checkpoint(path)
    return load_pretrained_cloob(path, **HEADS), params


def images(n: int = 3, h: int = IMAGE, w: int = IMAGE, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------------------------------------- numpy reference


def np_layer_norm(x: np.ndarray, p: dict) -> np.ndarray:
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * p["scale"] + p["offset"]


_erf = np.vectorize(math.erf)


def np_block(x: np.ndarray, get, heads: int, query_mask=None, key_mask=None) -> np.ndarray:
    """One pre-norm block for a single sequence (S, D); `get(path)` returns a Haiku group."""
    s, d = x.shape
    h = np_layer_norm(x, get("self_attention/layer_norm"))
    q, k, v = (h @ get(f"self_attention/multi_head_attention/{n}")["w"]
               + get(f"self_attention/multi_head_attention/{n}")["b"] for n in ("query", "key", "value"))
    q, k, v = (a.reshape(s, heads, d // heads) for a in (q, k, v))
    logits = np.einsum("thd,Thd->htT", q, k) / math.sqrt(d // heads)
    if query_mask is not None:  # cloob-training: mask rows (queries)
        logits = np.where(query_mask[None, :, None], logits, -1e30)
    if key_mask is not None:  # the usual way: mask columns (keys)
        logits = np.where(key_mask[None, None, :], logits, -1e30)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    att = np.einsum("htT,Thd->thd", weights, v).reshape(s, d)
    out = get("self_attention/multi_head_attention/linear")
    x = x + att @ out["w"] + out["b"]
    h = np_layer_norm(x, get("feed_forward/layer_norm"))
    h = h @ get("feed_forward/linear_0")["w"] + get("feed_forward/linear_0")["b"]
    h = 0.5 * h * (1 + _erf(h / math.sqrt(2)))
    return x + h @ get("feed_forward/linear_1")["w"] + get("feed_forward/linear_1")["b"]


def group_getter(params: dict, root: str, layer: int):
    return lambda rel: params[f"{root}/~/layer_{layer}/~/" + rel.replace("/", "/~/")]


def np_head(x0: np.ndarray, params: dict, root: str) -> np.ndarray:
    y = x0 @ params[f"{root}/~/proj"]["w"] + params[f"{root}/~/proj"]["b"]
    return y / np.linalg.norm(y)


def np_image_tower(pixels01: np.ndarray, params: dict, heads: int = 2) -> np.ndarray:
    """One (3, S, S) image in [0, 1] -> embedding, from the Haiku arrays (HWIO patch kernel)."""
    root, g = "vi_t_image_encoder", IMAGE // PATCH
    x = ((pixels01 - MEAN) / STD).reshape(3, g, PATCH, g, PATCH).transpose(1, 3, 2, 4, 0)
    patches = np.einsum("yxijc,ijco->yxo", x, params[f"{root}/~/embed"]["w"]).reshape(g * g, WIDTH)
    seq = np.concatenate([params[root]["class_embed"][None], patches]) + params[f"{root}/~/pos_embed"]["w"]
    for i in range(LAYERS):
        seq = np_block(seq, group_getter(params, root, i), heads)
    return np_head(seq[0], params, root)


def np_text_tower(ids: np.ndarray, params: dict, heads: int = 2, quirk: bool = True) -> np.ndarray:
    """One (77,) id row -> embedding; `quirk` picks cloob-training's query-axis mask, else key-axis."""
    root = "text_encoder"
    seen_eot = np.cumsum(ids == EOT) - (ids == EOT)
    mask = seen_eot == 0  # up to and including the first end token
    seq = params[f"{root}/~/embed"]["embeddings"][ids] + params[f"{root}/~/pos_embed"]["w"]
    for i in range(LAYERS):
        seq = np_block(seq, group_getter(params, root, i), heads,
                       query_mask=mask if quirk else None, key_mask=None if quirk else mask)
    return np_head(seq[0], params, root)


def token_row(words: list[int]) -> torch.Tensor:
    row = torch.zeros(1, CONTEXT, dtype=torch.long)
    row[0, :len(words) + 2] = torch.tensor([SOT, *words, EOT])
    return row


# ---------------------------------------------------------------------------------------------- embedding


def test_config_inferred_from_shapes(tiny) -> None:
    model, _ = tiny
    c = model.config
    assert (c.d_embed, c.image.image_size, c.image.patch_size, c.image.n_layers, c.image.width) == (16, 32, 8, 2, 32)
    assert (c.text.n_layers, c.text.width, c.text.context, c.text.vocab_size) == (2, 32, 77, 49408)
    assert (c.image.n_heads, c.text.n_heads) == (2, 2)
    assert model.dim == 16 and model.max_text_tokens == 77
    assert not any(p.requires_grad for p in model.parameters())


def test_image_embeddings(tiny) -> None:
    model, _ = tiny
    x = images(5, 40, 56)  # not square, not the tower's size: resized and cropped
    a = model.embed_images(x)
    assert a.shape == (5, 16) and a.dtype == torch.float32
    assert torch.allclose(a.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.equal(a, model.embed_images(x))
    one_by_one = torch.cat([model.embed_images(x[i:i + 1]) for i in range(5)])
    assert torch.allclose(a, one_by_one, atol=1e-5)
    assert (a[0] - a[1]).abs().max() > 1e-3  # different images, different embeddings


def test_image_tower_matches_numpy(tiny) -> None:
    model, (image_params, _) = tiny
    x = images(2, seed=1)  # already 32 x 32: no resampling, so numpy sees the same pixels
    got = model.embed_images(x).numpy()
    for i in range(2):
        want = np_image_tower(((x[i] + 1) / 2).double().numpy(), image_params)
        np.testing.assert_allclose(got[i], want, atol=2e-5)


def test_text_tower_matches_numpy_with_query_axis_mask(tiny) -> None:
    model, (_, text_params) = tiny
    ids = token_row([320, 1125, 539, 320, 2368])
    got = model.text(ids)[0].numpy()
    want = np_text_tower(ids[0].numpy(), text_params)
    np.testing.assert_allclose(got, want, atol=2e-5)
    # the usual key-axis mask gives a clearly different embedding: the test can tell them apart
    key_masked = np_text_tower(ids[0].numpy(), text_params, quirk=False)
    assert np.abs(got - key_masked).max() > 1e-2


def test_padding_after_eot_reaches_the_first_token_through_unmasked_keys(tiny) -> None:
    model, (_, text_params) = tiny
    ids = token_row([320, 2368])
    changed = ids.clone()
    changed[0, 30] = 1929  # a token after the end token, where padding (0) was
    a, b = model.text(ids)[0].numpy(), model.text(changed)[0].numpy()
    assert np.abs(a - b).max() > 1e-4  # keys after eot are seen by the first token
    np.testing.assert_allclose(b, np_text_tower(changed[0].numpy(), text_params), atol=2e-5)
    # with key-axis masking the change would be invisible
    np.testing.assert_allclose(np_text_tower(ids[0].numpy(), text_params, quirk=False),
                               np_text_tower(changed[0].numpy(), text_params, quirk=False), atol=1e-9)
    # and a second end token later does not re-open the mask
    mask = model.text.query_mask(torch.tensor([[SOT, 5, EOT, 0, EOT, 0]]))
    assert mask.tolist() == [[True, True, True, False, False, False]]


@needs_vocab
def test_text_embeddings(tiny) -> None:
    model, (_, text_params) = tiny
    texts = ["a photo of a cat", "a dog", "", "cat " * 100]
    a = model.embed_texts(texts)
    assert a.shape == (4, 16)
    assert torch.allclose(a.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.equal(a, model.embed_texts(texts))
    assert torch.allclose(a, torch.cat([model.embed_texts([t]) for t in texts]), atol=1e-5)
    np.testing.assert_allclose(a[0].numpy(), np_text_tower(token_row([320, 1125, 539, 320, 2368])[0].numpy(),
                                                           text_params), atol=2e-5)
    assert model.count_tokens("a photo of a cat") == 7
    with pytest.raises(UserError, match="77"):
        model.check_prompt("cat " * 100)


def test_both_separators_load_the_same(tmp_path) -> None:
    write_checkpoint(tmp_path / "tilde.pkl", sep="/~/")
    write_checkpoint(tmp_path / "slash.pkl", sep="/")
    a, b = (load_pretrained_cloob(tmp_path / n, **HEADS) for n in ("tilde.pkl", "slash.pkl"))
    x = images(2)
    assert torch.equal(a.embed_images(x), b.embed_images(x))
    ids = token_row([320])
    assert torch.equal(a.text(ids), b.text(ids))


# ---------------------------------------------------------------------------------------------- safetensors cache


def test_cache_is_written_once_and_used(tmp_path) -> None:
    pkl, cache = tmp_path / "tiny.pkl", tmp_path / "tiny.safetensors"
    write_checkpoint(pkl)
    first = load_pretrained_cloob(pkl, **HEADS)
    assert cache.is_file()
    stamp = cache.stat().st_mtime_ns
    x, ids = images(2), token_row([320, 2368])
    want_img, want_txt = first.embed_images(x), first.text(ids)

    second = load_pretrained_cloob(pkl)  # the heads come back from the cache's config
    assert second.config == first.config
    assert cache.stat().st_mtime_ns == stamp
    assert torch.equal(second.embed_images(x), want_img) and torch.equal(second.text(ids), want_txt)
    direct = load_pretrained_cloob(cache)
    assert torch.equal(direct.embed_images(x), want_img)

    # the cache stands for the pickle while it is at least as new: an older pickle is not read at all
    pkl.write_bytes(b"not a pickle")
    os.utime(pkl, ns=(stamp - 10**9, stamp - 10**9))
    assert torch.equal(load_pretrained_cloob(pkl).embed_images(x), want_img)
    # a pickle changed after the cache was written is read again
    os.utime(pkl, ns=(stamp + 10**9, stamp + 10**9))
    with pytest.raises(UserError, match="tiny.pkl"):
        load_pretrained_cloob(pkl)
    write_checkpoint(pkl, seed=1)
    os.utime(pkl, ns=(stamp + 10**9, stamp + 10**9))
    replaced = load_pretrained_cloob(pkl, **HEADS)
    assert not torch.allclose(replaced.embed_images(x), want_img)
    assert cache.stat().st_mtime_ns != stamp
    assert torch.equal(load_pretrained_cloob(cache).embed_images(x), replaced.embed_images(x))


def test_damaged_cache_is_rebuilt(tmp_path) -> None:
    pkl, cache = tmp_path / "tiny.pkl", tmp_path / "tiny.safetensors"
    write_checkpoint(pkl)
    want = load_pretrained_cloob(pkl, **HEADS).embed_images(images(1))
    cache.write_bytes(cache.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="ignoring the cached conversion"):
        again = load_pretrained_cloob(pkl, **HEADS)
    assert torch.equal(again.embed_images(images(1)), want)
    assert torch.equal(load_pretrained_cloob(cache).embed_images(images(1)), want)
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]  # no temp file left behind
    save_file({"something.else": torch.zeros(3)}, str(cache))  # readable, but not a conversion of this pickle
    with pytest.warns(UserWarning, match="ignoring the cached conversion.*no weight for image"):
        again = load_pretrained_cloob(pkl, **HEADS)
    assert torch.equal(again.embed_images(images(1)), want)


def test_cache_that_cannot_be_written_is_skipped(tmp_path) -> None:
    pkl = tmp_path / "tiny.pkl"
    write_checkpoint(pkl)
    (tmp_path / "tiny.safetensors").mkdir()  # the rename onto it fails, even for root
    (tmp_path / "tiny.safetensors" / "keep").write_text("x")
    for _ in range(2):
        assert load_pretrained_cloob(pkl, **HEADS).embed_images(images(1)).shape == (1, 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pkl", "tiny.safetensors"]  # no temp files


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a folder this user cannot write")
def test_read_only_folder_skips_the_cache(tmp_path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    write_checkpoint(folder / "tiny.pkl")
    folder.chmod(0o555)
    try:
        model = load_pretrained_cloob(folder / "tiny.pkl", **HEADS)
        assert model.embed_images(images(1)).shape == (1, 16)
        assert sorted(p.name for p in folder.iterdir()) == ["tiny.pkl"]
    finally:
        folder.chmod(0o755)


def test_known_name_with_other_bytes_warns_once(tmp_path) -> None:
    name = next(iter(KNOWN_SHA256))
    pkl = tmp_path / f"{name}.pkl"
    write_checkpoint(pkl)
    with pytest.warns(UserWarning, match="SHA-256"):
        load_pretrained_cloob(pkl, **HEADS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_pretrained_cloob(pkl)  # from the cache: not hashed again
    assert not [w for w in caught if "SHA-256" in str(w.message)]
    import hashlib
    assert sha256_file(pkl) == hashlib.sha256(pkl.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- bad inputs


class RunsCommand:
    """A pickle payload that would run a shell command when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class WritesFile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("payload, refused", [(RunsCommand, "system"), (WritesFile, "builtins.exec")])
def test_malicious_pickle_never_runs(tmp_path, payload, refused) -> None:
    marker = tmp_path / "pwned"
    image, text = haiku_params()
    image["vi_t_image_encoder"]["class_embed"] = payload(marker)
    pkl = write_pickle(tmp_path / "evil.pkl", {"params": (image, text)})
    with pytest.raises(UserError, match=f"refusing to load .*evil.pkl.*{refused}.*only arrays"):
        load_pretrained_cloob(pkl)
    with pytest.raises(UserError, match=refused):
        load_pickle_arrays(pkl)
    assert not marker.exists()
    assert not (tmp_path / "evil.safetensors").exists()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_safe_unpickler_reads_arrays_of_every_protocol(tmp_path, protocol) -> None:
    obj = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "f": np.asfortranarray(np.ones((2, 3))),
           "s": np.float32(1.5), "o": collections.OrderedDict(x=[1, (2, 3)]), "set": {1, 2}, "b": b"\x00\xff"}
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    back = load_pickle_arrays(path)
    assert back.keys() == obj.keys() and back["o"] == obj["o"] and back["set"] == {1, 2} and back["b"] == b"\x00\xff"
    np.testing.assert_array_equal(back["a"], obj["a"])
    np.testing.assert_array_equal(back["f"], obj["f"])
    assert back["s"] == np.float32(1.5) and back["a"].dtype == np.float32


def test_truncated_missing_and_garbage_files(tmp_path) -> None:
    pkl = tmp_path / "tiny.pkl"
    write_checkpoint(pkl)
    pkl.write_bytes(pkl.read_bytes()[: pkl.stat().st_size // 2])
    with pytest.raises(UserError, match="tiny.pkl is not a readable pickle"):
        load_pretrained_cloob(pkl)
    with pytest.raises(UserError, match="does not exist"):
        load_pretrained_cloob(tmp_path / "nowhere.pkl")
    with pytest.raises(UserError, match="does not exist"):
        load_pickle_arrays(tmp_path / "nowhere.pkl")
    junk = tmp_path / "junk.pkl"
    for content in (b"PK\x03\x04" + bytes(range(256)), b"\x00\x01 not a pickle", b""):
        junk.write_bytes(content)
        with pytest.raises(UserError, match="junk.pkl"):
            load_pretrained_cloob(junk)
    bad_st = tmp_path / "junk.safetensors"
    bad_st.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(UserError, match="junk.safetensors"):
        load_pretrained_cloob(bad_st)


def _renamed(params: tuple[dict, dict], old: str, new: str) -> tuple[dict, dict]:
    image, text = params
    image[new] = image.pop(old)
    return image, text


@pytest.mark.parametrize("content, message", [
    ({"weights": {}}, "not a cloob-training checkpoint: expected a dict with 'params'"),
    ([1, 2, 3], "expected a dict with 'params', found list"),
    ({"params": ({},)}, "'params' should be a pair"),
    ({"params": tuple(reversed(haiku_params()))}, "unexpected parameter group"),
    ({"params": _renamed(haiku_params(), "vi_t_image_encoder/~/layer_0/~/feed_forward/~/linear_0",
                         "vi_t_image_encoder/~/layer_0/~/mlp/~/linear_0")}, "unexpected parameter group"),
    ({"params": ({"vi_t_image_encoder": {"class_embed": "hello"}}, {})}, "not a float array"),
    ({"params": ({"vi_t_image_encoder": {"class_embed": np.zeros(4, np.float32)}}, {})}, "no weight for"),
])
def test_foreign_content(tmp_path, content, message) -> None:
    pkl = write_pickle(tmp_path / "foreign.pkl", content)
    with pytest.raises(UserError, match=message) as info:
        load_pretrained_cloob(pkl, **HEADS)
    assert "\n" not in str(info.value)


def test_shape_mismatches_name_the_tensor(tmp_path) -> None:
    pkl = tmp_path / "tiny.pkl"
    write_checkpoint(pkl)
    wider = CLOOBConfig(d_embed=16, image=ImageTowerConfig(image_size=32, patch_size=8, n_layers=2, width=64,
                                                          n_heads=2),
                        text=TextTowerConfig(n_layers=2, width=32, n_heads=2))
    with pytest.raises(UserError, match=r"image\.class_embed .*\(32,\).*\(64,\)"):
        load_pretrained_cloob(pkl, config=wider)
    image, text = haiku_params()
    image["vi_t_image_encoder/~/layer_1/~/self_attention/~/multi_head_attention/~/key"]["w"] = np.zeros((32, 8),
                                                                                                        np.float32)
    bad = write_pickle(tmp_path / "bad.pkl", {"params": (image, text)})
    with pytest.raises(UserError, match=r"image\.blocks\.1\.key\.weight .*layer_1.*key.*'w'"):
        load_pretrained_cloob(bad, **HEADS)
    with pytest.raises(UserError, match="cannot be split into 3"):
        load_pretrained_cloob(pkl, n_heads_image=3)
