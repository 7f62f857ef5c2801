"""The shapes analyzer reads real data right and rejects images that break the contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cclddg.data.images import image_to_tensor
from cclddg.data.shapes import ATTRIBUTES, PALETTE, make_sample, render
from cclddg.errors import UserError
from cclddg.evaluation import Analysis, analyze, score


def _accuracy(size: int, n: int, noise: float = 0.0, seed: int = 5) -> dict:
    """Score real samples; with `noise`, Gaussian noise of that std in [-1, 1] units (as tensors)."""
    rng = np.random.default_rng(seed)
    samples = [make_sample(i, seed=seed, size=size) for i in range(n)]
    images = [np.asarray(s.image) for s in samples]
    if noise:
        images = [torch.from_numpy((x.transpose(2, 0, 1) / 127.5 - 1.0
                                    + noise * rng.standard_normal((3, size, size))).astype(np.float32))
                  for x in images]
    return score(images, [s.attrs for s in samples])


@pytest.mark.parametrize("size", [32, 64, 128])
def test_accuracy_on_real_data(size):
    result = _accuracy(size, 300)
    assert result["validity"] >= 0.99
    for attr in ATTRIBUTES:
        assert result[f"{attr}_acc"] >= 0.99, (attr, result)


@pytest.mark.parametrize("size", [32, 64])
def test_mild_noise_still_reads(size):
    result = _accuracy(size, 200, noise=0.05)
    assert result["validity"] >= 0.98
    for attr in ATTRIBUTES:
        assert result[f"{attr}_acc"] >= 0.98, (attr, result)


def test_size_16_works():
    result = _accuracy(16, 150)
    assert result["validity"] >= 0.95 and result["mean_acc"] >= 0.95


def test_input_kinds_agree():
    sample = make_sample(4, size=48)
    expected = analyze(sample.image)
    assert isinstance(expected, Analysis) and expected.valid and expected.reason == ""
    assert expected.attrs() == sample.attrs
    assert analyze(np.asarray(sample.image)) == expected
    assert analyze(image_to_tensor(sample.image)) == expected
    with pytest.raises(UserError):
        analyze(torch.zeros(1, 3, 8, 8))
    with pytest.raises(UserError):
        analyze(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(UserError):
        analyze("image.png")


def _flat(size: int, rgb) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, np.uint8), (size, size, 3)).copy()


def test_blank_is_invalid():
    result = analyze(_flat(64, PALETTE["green"]))
    assert not result.valid and result.reason == "no shape" and result.background == "green"


def test_two_shapes_are_invalid():
    base = {"size": "small", "background": "blue"}
    a = np.asarray(render(64, {**base, "color": "red", "shape": "circle", "position": "top left"}))
    b = np.asarray(render(64, {**base, "color": "yellow", "shape": "square", "position": "bottom right"}))
    both = np.where(np.any(b != a[0, 0], axis=2, keepdims=True), b, a)
    result = analyze(both)
    assert not result.valid and "2 separate shapes" in result.reason


def test_random_noise_is_invalid():
    rng = np.random.default_rng(0)
    for size in (32, 64):
        noise = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        assert not analyze(noise).valid
    assert not analyze(torch.randn(3, 64, 64)).valid


def test_speckled_background_is_invalid():
    image = np.asarray(make_sample(0, size=64).image).copy()
    rng = np.random.default_rng(1)
    spots = rng.random((64, 64)) < 0.1
    image[spots] = rng.integers(0, 256, (int(spots.sum()), 3), dtype=np.uint8)
    assert not analyze(image).valid


def test_non_palette_colour_is_invalid():
    attrs = {"color": "red", "shape": "square", "size": "large", "position": "center", "background": "white"}
    image = np.asarray(render(64, attrs, None)).copy()
    red = np.all(image == PALETTE["red"], axis=2)
    image[red] = (128, 128, 128)
    result = analyze(image)
    assert not result.valid and result.color is None and "palette" in result.reason


def test_non_shape_blob_is_invalid():
    image = _flat(64, PALETTE["black"])
    image[20:28, 10:54] = PALETTE["white"]  # a long bar: no circle, square or triangle
    result = analyze(image)
    assert not result.valid and result.shape is None


def test_score_counts_and_invalid_is_wrong():
    samples = [make_sample(i, size=32) for i in range(20)]
    requests = [s.named_attrs for s in samples]
    result = score([s.image for s in samples], requests, return_analyses=True)
    assert result["n"] == 20 and result["validity"] == 1.0 and result["mean_acc"] == 1.0
    for attr in ATTRIBUTES:
        assert result[f"{attr}_n"] == sum(attr in r for r in requests)
    assert len(result["analyses"]) == 20 and result["analyses"][0]["valid"]
    blank = score([_flat(32, PALETTE["blue"])], [{"color": "red", "background": "blue"}])
    assert blank["validity"] == 0.0 and blank["color_acc"] == 0.0 and blank["background_acc"] == 0.0
    assert blank["shape_acc"] is None and blank["shape_n"] == 0
    with pytest.raises(UserError, match="pair up"):
        score([samples[0].image], [])
    with pytest.raises(UserError, match="choose from"):
        score([samples[0].image], [{"hue": "red"}])


def test_tiny_image_is_invalid_not_crash():
    assert not analyze(Image.new("RGB", (6, 6))).valid
