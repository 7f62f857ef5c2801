"""The built-in shapes data keeps the contract evaluation relies on (docs/DESIGN.md, "The shapes contract")."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from cclddg.data import images as imgs
from cclddg.data.shapes import (
    ATTRIBUTE_VALUES,
    ATTRIBUTES,
    COLORS,
    LABEL_DIM,
    PALETTE,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesDataset,
    attrs_to_label,
    label_to_attrs,
    make_sample,
    parse_attrs,
    parse_caption,
    render,
)
from cclddg.errors import UserError

SIZE_FRACTION = {"small": 0.25, "large": 0.45}
GRID = (0.25, 0.5, 0.75)


def test_vocabularies():
    assert COLORS == ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
    assert PALETTE["red"] == (220, 40, 40) and PALETTE["black"] == (20, 20, 20)
    assert SHAPES == ("circle", "square", "triangle") and SIZES == ("small", "large")
    assert POSITIONS[0] == "top left" and POSITIONS[4] == "center" and POSITIONS[8] == "bottom right"
    assert ATTRIBUTE_VALUES["background"] == COLORS
    assert LABEL_DIM == 35


def test_deterministic_from_seed_and_index():
    for i in (0, 5, 12345):
        a, b = make_sample(i, seed=3, size=32), make_sample(i, seed=3, size=32)
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
        assert (a.caption, a.attrs, a.named) == (b.caption, b.attrs, b.named)
    differ = sum(make_sample(i, seed=0, size=32).caption != make_sample(i, seed=1, size=32).caption for i in range(20))
    assert differ >= 15
    images = {np.asarray(make_sample(i, size=32).image).tobytes() for i in range(20)}
    assert len(images) == 20


def _check_contract(sample, size: int) -> None:
    """Flat exact palette background, shape fully inside, sizes and positions within jitter."""
    arr = np.asarray(sample.image).astype(np.float32)
    assert arr.shape == (size, size, 3)
    attrs = sample.attrs
    assert attrs["color"] != attrs["background"]
    bg, fg = np.array(PALETTE[attrs["background"]]), np.array(PALETTE[attrs["color"]])
    x0, y0, x1, y1 = sample.box
    assert 0 <= x0 and 0 <= y0 and x1 <= size and y1 <= size
    side = x1 - x0
    assert abs((y1 - y0) - side) < 1e-6
    frac = SIZE_FRACTION[attrs["size"]]
    assert 0.9 * frac * size - 1e-6 <= side <= 1.1 * frac * size + 1e-6
    row, col = divmod(POSITIONS.index(attrs["position"]), 3)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    for c, g, lo, hi in ((cx, GRID[col], x0, x1), (cy, GRID[row], y0, y1)):
        clamped = lo < 1e-6 or hi > size - 1e-6
        assert abs(c - g * size) <= size / 32 + 1e-6 or clamped
    # outside the box (grown by a pixel) is exactly the background colour
    ys, xs = np.mgrid[0:size, 0:size]
    outside = (xs + 1 <= np.floor(x0)) | (xs >= np.ceil(x1) + 1) | (ys + 1 <= np.floor(y0)) | (ys >= np.ceil(y1) + 1)
    assert outside.any() and np.all(arr[outside] == bg)
    # every pixel is a blend of background and shape colour, the purest one exactly the shape colour
    d = fg - bg
    alpha = np.clip(((arr - bg) @ d) / (d @ d), 0, 1)
    assert np.abs(arr - (bg + alpha[..., None] * d)).max() <= 1.5
    if size >= 32:
        assert np.any(np.all(arr == fg, axis=2))
    # coverage area matches the shape type
    area = alpha.sum() / side ** 2
    expected = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[attrs["shape"]]
    assert abs(area - expected) < 0.12
    # centre of mass: the box centre, or 2/3 down from the apex for a triangle
    mass_x = (alpha * (xs + 0.5)).sum() / alpha.sum()
    mass_y = (alpha * (ys + 0.5)).sum() / alpha.sum()
    expect_y = y0 + 2 * side / 3 if attrs["shape"] == "triangle" else cy
    assert abs(mass_x - cx) < 0.3 and abs(mass_y - expect_y) < 0.3


@pytest.mark.parametrize("size", [17, 32, 64, 128])
def test_contract_any_size(size):
    n = 60 if size < 128 else 25
    for i in range(n):
        _check_contract(make_sample(i, seed=7, size=size), size)


def test_attributes_roughly_uniform():
    counts = {a: {v: 0 for v in ATTRIBUTE_VALUES[a]} for a in ATTRIBUTES}
    n = 1800
    for i in range(n):
        for a, v in make_sample(i, size=8).attrs.items():
            counts[a][v] += 1
    for a in ATTRIBUTES:
        expected = n / len(ATTRIBUTE_VALUES[a])
        assert all(0.7 * expected < c < 1.3 * expected for c in counts[a].values()), (a, counts[a])


def test_caption_agrees_with_named():
    skeletons = set()
    pattern = re.compile(r"\b(" + "|".join(list(COLORS) + list(SHAPES) + list(SIZES)
                                          + sorted(POSITIONS, key=len, reverse=True)) + r")\b")
    for i in range(600):
        s = make_sample(i, seed=11, size=8)
        assert s.named and set(s.named) <= set(ATTRIBUTES)
        assert parse_caption(s.caption) == s.named_attrs, s.caption
        skeletons.add(pattern.sub("X", s.caption))
    assert len(skeletons) >= 8


def test_caption_examples_parse():
    assert parse_caption("a large red circle in the top left on a blue background") == {
        "color": "red", "shape": "circle", "size": "large", "position": "top left", "background": "blue"}
    assert parse_caption("blue background, small yellow square at the bottom") == {
        "color": "yellow", "shape": "square", "size": "small", "position": "bottom", "background": "blue"}
    assert parse_caption("a green triangle") == {"color": "green", "shape": "triangle"}


def test_name_probs():
    for i in range(30):
        assert len(make_sample(i, size=8, name_probs={a: 0.0 for a in ATTRIBUTES}).named) == 1
        assert make_sample(i, size=8, name_probs={a: 1.0 for a in ATTRIBUTES}).named == ATTRIBUTES
    only = make_sample(0, size=8, name_probs={"colour": 1.0, "shape": 0, "size": 0, "position": 0, "bg": 0})
    assert only.named == ("color",)
    with pytest.raises(UserError, match="choose from"):
        make_sample(0, name_probs={"hue": 0.5})
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        make_sample(0, name_probs={"color": 1.5})


def test_render_checks_and_no_jitter():
    attrs = {"color": "red", "shape": "square", "size": "large", "position": "center", "background": "blue"}
    a, b = render(64, attrs, None), render(64, attrs, None)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    arr = np.asarray(a)
    assert tuple(arr[32, 32]) == PALETTE["red"] and tuple(arr[0, 0]) == PALETTE["blue"]
    jittered = render(64, attrs, np.random.default_rng(0))
    assert isinstance(jittered, Image.Image) and jittered.size == (64, 64)
    with pytest.raises(UserError, match="must differ"):
        render(64, {**attrs, "background": "red"}, None)
    with pytest.raises(UserError, match="missing: position"):
        render(64, {k: v for k, v in attrs.items() if k != "position"}, None)
    with pytest.raises(UserError, match="circle, square, triangle"):
        render(64, {**attrs, "shape": "hexagon"}, None)
    with pytest.raises(UserError, match=">= 8"):
        render(4, attrs, None)


def test_label_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(200):
        named = {a: str(rng.choice(ATTRIBUTE_VALUES[a])) for a in ATTRIBUTES if rng.random() < 0.5}
        label = attrs_to_label(named)
        assert label.dtype == np.float32 and label.shape == (LABEL_DIM,)
        assert label.sum() == len(ATTRIBUTES)
        assert label_to_attrs(label) == named
        assert label_to_attrs(torch.from_numpy(label)) == named
    empty = attrs_to_label({})
    assert label_to_attrs(empty) == {} and empty[8] == 1.0 and empty[-1] == 1.0
    with pytest.raises(UserError):
        label_to_attrs(np.zeros(10))
    with pytest.raises(UserError, match="unknown color"):
        attrs_to_label({"color": "pink"})


def test_parse_attrs():
    assert parse_attrs("color=red,shape=circle,position=top left") == {
        "color": "red", "shape": "circle", "position": "top left"}
    assert parse_attrs(" colour = Blue , bg=white, size=small, position=centre") == {
        "color": "blue", "size": "small", "position": "center", "background": "white"}
    assert parse_attrs("") == {}
    with pytest.raises(UserError, match="color, shape, size, position, background"):
        parse_attrs("hue=red")
    with pytest.raises(UserError, match="red, green, blue"):
        parse_attrs("color=pink")
    with pytest.raises(UserError, match="key=value"):
        parse_attrs("red")
    with pytest.raises(UserError, match="twice"):
        parse_attrs("color=red,colour=blue")
    with pytest.raises(ValueError):  # UserError is a ValueError
        parse_attrs("position=middle left")


def test_dataset_items():
    ds = ShapesDataset(size=32, length=10, seed=2)
    assert len(ds) == 10
    item = ds[3]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["label"].shape == (LABEL_DIM,) and item["index"] == 3
    assert label_to_attrs(item["label"]) == parse_caption(item["caption"])
    sample = make_sample(3, seed=2, size=32)
    assert item["caption"] == sample.caption
    assert torch.equal(item["image"], imgs.image_to_tensor(sample.image))
    images, labels, captions = ds.get_batch([3, 4, 5])
    assert images.shape == (3, 3, 32, 32) and labels.shape == (3, LABEL_DIM) and len(captions) == 3
    assert torch.equal(images[0], item["image"]) and torch.equal(labels[0], item["label"])
    with pytest.raises(IndexError):
        ds[10]
    pairs = list(ds.iter_source())
    assert len(pairs) == 10 and isinstance(pairs[0][0], Image.Image) and pairs[3][1] == sample.caption


def test_endless_dataset():
    ds = ShapesDataset(size=16)
    assert len(ds) == 2 ** 62
    assert ds[10 ** 15]["image"].shape == (3, 16, 16)
    source = ds.iter_source()
    first = [next(source) for _ in range(3)]
    assert all(im.size == (16, 16) and isinstance(c, str) for im, c in first)
    with pytest.raises(UserError):
        ShapesDataset(length=0)
    with pytest.raises(UserError):
        ShapesDataset(size=4)


def test_image_helpers():
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    t = imgs.image_to_tensor(Image.fromarray(arr))
    assert t.shape == (3, 5, 7) and t.min() >= -1 and t.max() <= 1
    assert np.array_equal(np.asarray(imgs.tensor_to_image(t)), arr)
    grid = imgs.make_grid(torch.zeros(5, 3, 8, 8), nrow=2, padding=2)
    assert grid.size == (2 * 10 + 2, 3 * 10 + 2)
    assert np.asarray(grid)[0, 0].tolist() == [255, 255, 255] and np.asarray(grid)[2, 2].tolist() == [128, 128, 128]
    with pytest.raises(UserError):
        imgs.make_grid(torch.zeros(3, 8, 8), nrow=2)


def test_request_prompts_use_the_captions_article():
    from cclddg.data.shapes import request_prompt

    assert request_prompt({"color": "orange", "shape": "circle", "position": "center"}).startswith("an orange circle")
    assert request_prompt({"color": "red", "shape": "square", "position": "top left"}).startswith("a red square")


def test_a_holdout_leaves_its_pairs_out_of_every_image_and_keeps_the_rest():
    from collections import Counter

    from cclddg.data.shapes import check_holdout, format_holdout, parse_holdout
    from cclddg.data.sources import open_source, parse_data_spec

    spec = parse_data_spec("shapes:32:holdout=red-triangle,blue-circle")
    assert spec.size == 32 and spec.holdout == {("red", "triangle"), ("blue", "circle")}
    assert parse_data_spec("shapes:holdout=red-triangle").size is None
    data = open_source(spec, 32, length=3000).data
    pairs = Counter((data.sample(i).attrs["color"], data.sample(i).attrs["shape"]) for i in range(3000))
    assert pairs[("red", "triangle")] == 0 and pairs[("blue", "circle")] == 0
    assert len(pairs) == 8 * 3 - 2  # every other pair is still drawn
    assert pairs[("red", "circle")] > 80 and pairs[("green", "triangle")] > 80
    assert format_holdout(parse_holdout(" Blue-Circle,red-triangle ")) == "red-triangle,blue-circle"
    plain, held = ShapesDataset(32, seed=0), ShapesDataset(32, seed=0, holdout=[("red", "triangle")])
    same = [i for i in range(300) if plain.sample(i).attrs["color"] != "red"]
    assert all(torch.equal(plain[i]["image"], held[i]["image"]) for i in same)  # other colours: the same images
    with pytest.raises(UserError, match="every shape in red"):
        check_holdout([("red", s) for s in ("circle", "square", "triangle")])
    with pytest.raises(UserError, match="every colour of the circle"):
        check_holdout([(c, "circle") for c in COLORS])
    for bad, message in [("shapes:32:holdout=red", "COLOR-SHAPE"), ("shapes:32:holdout=pink-circle", "unknown color"),
                         ("shapes:32:big", "image size")]:
        with pytest.raises(UserError, match=message):
            parse_data_spec(bad)


def test_request_prompts_name_exactly_the_requested_attributes():
    from cclddg.data.shapes import parse_caption, request_prompt

    assert request_prompt({"color": "red", "shape": "circle", "position": "top left"}) == "a red circle in the top left"
    for request in [{"color": "orange"}, {"shape": "triangle", "position": "bottom"}, {"size": "small"},
                    {"color": "white", "background": "black"}, {}]:
        assert parse_caption(request_prompt(request)) == request
