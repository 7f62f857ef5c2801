"""The variety measurement (evaluation/variety.py): the data's distribution from the contract, the metrics on
closed forms, and that a generator which draws real images scores like the data while a collapsed one fails."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cclddg.data.images import image_to_tensor
from cclddg.data.shapes import COLORS, render
from cclddg.evaluation.variety import (
    conditional,
    data_combinations,
    entropy,
    expected_distinct,
    marginal,
    mean_pairwise_distance,
    total_variation,
    variety_report,
    variety_requests,
    variety_table,
    z_variety,
)

HOLD = frozenset({("red", "triangle")})


def test_the_datas_distribution_follows_the_contract():
    combos = data_combinations()
    assert len(combos) == 8 * 3 * 2 * 9 * 7
    assert sum(p for _, p in combos) == pytest.approx(1.0)
    red = conditional({"color": "red"})
    shapes = marginal(red, ("shape",))
    assert shapes == pytest.approx({("circle",): 1 / 3, ("square",): 1 / 3, ("triangle",): 1 / 3})
    backgrounds = marginal(red, ("background",))
    assert set(backgrounds) == {(c,) for c in COLORS if c != "red"}  # another colour, uniformly
    assert entropy(backgrounds.values()) == pytest.approx(math.log2(7))
    # a holdout: red shapes are circles or squares only; a request for the held-out pair gets the contract's
    # distribution (what such an image would be)
    assert marginal(conditional({"color": "red"}, HOLD), ("shape",)) == pytest.approx(
        {("circle",): 0.5, ("square",): 0.5})
    held = conditional({"color": "red", "shape": "triangle"}, HOLD)
    assert held and all(a["shape"] == "triangle" for a, _ in held)
    assert all(not ({"color", "shape"} <= set(r) and (r["color"], r["shape"]) in HOLD)
               for r in variety_requests(2, 50, 0, HOLD))


def test_metric_closed_forms():
    assert entropy([0.5, 0.5]) == pytest.approx(1.0)
    assert entropy([1.0]) == 0.0
    assert total_variation({"a": 1.0}, {"a": 0.5, "b": 0.5}) == pytest.approx(0.5)
    assert total_variation({"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5}) == 0.0
    assert expected_distinct({"a": 0.5, "b": 0.5}, 1) == pytest.approx(1.0)
    assert expected_distinct({"a": 0.5, "b": 0.5}, 2) == pytest.approx(1.5)
    same = torch.zeros(4, 3, 8, 8)
    assert mean_pairwise_distance(same) == 0.0
    two = torch.stack([-torch.ones(3, 8, 8), torch.ones(3, 8, 8)])
    assert mean_pairwise_distance(two) == pytest.approx(1.0)  # black vs white: RMS distance 1 in [0, 1] units


def _real_sampler(size: int):
    """A 'generator' that draws real images for the request each condition row stands for."""
    def sample(cond, count, seed):
        rng = np.random.default_rng(seed)
        out = []
        for request in cond:
            combos = conditional(request)
            pick = rng.choice(len(combos), p=np.array([p for _, p in combos]))
            out.append(image_to_tensor(render(size, combos[pick][0], rng)))
        return torch.stack(out)
    return sample


def test_real_images_score_like_the_data_and_a_collapsed_generator_does_not():
    size = 32
    conditions = list  # the requests themselves stand for the conditions
    real = variety_report(_real_sampler(size), conditions, size, requests_per_group=3, n=48, seed=0, real=False)
    for group in real["groups"].values():
        assert group["adherence"]["validity"] == 1.0 and group["adherence"]["mean_acc"] == 1.0
        for attr, row in group["open"].items():
            assert row["entropy_ratio"] > 0.8, attr  # 48 draws of up to 9 values
            assert row["tv"] < 0.25, attr  # finite-sample noise of 48 draws: 0.02-0.2 here

    one = render(size, {"color": "red", "shape": "circle", "size": "large", "position": "center",
                        "background": "blue"})

    def collapsed(cond, count, seed):
        return image_to_tensor(one)[None].repeat(count, 1, 1, 1)

    report = variety_report(collapsed, conditions, size, requests_per_group=3, n=24, seed=0)
    for group in report["groups"].values():
        assert group["distinct"] == pytest.approx(1.0)
        assert all(row["entropy_ratio"] == 0.0 for row in group["open"].values())
        assert group["real"]["distinct"] > 5  # the reference beside it
    lines = variety_table(report)
    assert lines[0].startswith("| attributes named") and len(lines) == 2 + 2 * 3


def test_variety_from_z_separates_a_generator_that_ignores_z():
    size = 32
    frozen = torch.zeros(3, size, size)

    def ignores_noise(cond, count, seed):
        return frozen[None].repeat(count, 1, 1, 1)

    def uses_z(cond, count, seed):
        return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1

    def image_condition(image, attrs):
        return torch.zeros(1, 4)

    flat = z_variety(ignores_noise, ignores_noise, image_condition, size, prompts=2, n=4)
    assert flat["z_only"] == 0.0 and flat["z_only_vs_real"] == 0.0 and flat["real"] > 0
    lively = z_variety(uses_z, uses_z, image_condition, size, prompts=2, n=4)
    assert lively["z_only_vs_real"] > 1.0
    assert "z_only" not in z_variety(uses_z, None, image_condition, size, prompts=1, n=3)
