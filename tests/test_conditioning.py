"""The conditioning kinds' parts: pseudo-text, dropout, the text/image mix through a text prior (tests/test_priors.py
tests the priors themselves)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cclddg.conditioning.base import drop
from cclddg.conditioning.embedding import pseudo_text, training_condition
from cclddg.conditioning.prompts import PromptConditioner
from cclddg.errors import UserError
from cclddg.priors import EmbeddingStats, PriorSettings, make_text_prior


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("xi", [0.25, 0.75, 1.5])
def test_pseudo_text_is_a_unit_vector_at_the_angle_xi_sets(xi):
    c = unit(4000, 256)
    torch.manual_seed(1)  # not unit()'s seed: the noise must not be c itself
    out = pseudo_text(c, xi)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(4000))
    # |e/|e|| = 1 and e is nearly orthogonal to c in 256-d: cos(c, c') ~ 1 / sqrt(1 + xi^2)
    assert (c * out).sum(-1).mean().item() == pytest.approx(1 / math.sqrt(1 + xi ** 2), abs=0.01)
    assert torch.equal(pseudo_text(c, 0.0), c)


def test_training_condition_mixes_text_and_pseudo_text_and_drop_nulls_rows():
    image, text = unit(2000, 32, seed=1), unit(2000, 32, seed=2)
    torch.manual_seed(0)
    only_images = training_condition(image, text, pct_text=0.0, xi=0.0)
    assert torch.equal(only_images, image)
    assert torch.equal(training_condition(image, text, pct_text=1.0, xi=0.5), text)
    mixed = training_condition(image, text, pct_text=0.3, xi=0.0)
    from_text = (mixed == text).all(-1).float().mean().item()
    assert from_text == pytest.approx(0.3, abs=0.04)
    # fixed grids draw nothing from the RNG
    state = torch.get_rng_state()
    assert torch.equal(training_condition(image, text, 0.5, 1.0, random=False), image)
    assert torch.equal(torch.get_rng_state(), state)
    dropped = drop(image, 0.25)
    null = (dropped == 0).all(-1)
    assert null.float().mean().item() == pytest.approx(0.25, abs=0.04)
    assert torch.equal(dropped[~null], image[~null])


class FakeEmbedder:
    """Texts embedded by a fixed table: enough for the conditioner's own logic (the real embedders are tested
    through the pipeline in test_prompted.py)."""

    dim = 8

    def check_prompt(self, text: str) -> str:
        if not text.strip():
            raise UserError("the prompt is empty")
        return text

    def embed_texts(self, texts):
        return torch.stack([unit(1, 8, seed=len(t))[0] for t in texts])

    def embed_images(self, images):
        return F.normalize(images.flatten(1)[:, :8], dim=-1)


def test_prompt_conditioner_maps_texts_through_its_prior_and_mixes_images():
    bank = unit(40, 8, seed=9)
    prior = make_text_prior(PriorSettings("retrieval", k=3), EmbeddingStats(bank.mean(0), bank.mean(0), bank.half()), dim=8)
    cond = PromptConditioner(FakeEmbedder(), prior)
    rows = cond(["a red circle", "a box"], n=4, seed=1)
    assert rows.shape == (8, 8)
    assert all((bank.half().float() == r).all(-1).any() for r in rows)  # every row is a bank row
    assert torch.equal(rows, cond(["a red circle", "a box"], n=4, seed=1))
    images = torch.rand(1, 3, 4, 4) * 2 - 1
    mixed = cond(["a red circle"], images, image_weight=1.0, n=2)
    torch.testing.assert_close(mixed, FakeEmbedder().embed_images(images).repeat(2, 1))
    plain = PromptConditioner(FakeEmbedder())  # no prior: the text embeddings as they are
    torch.testing.assert_close(plain.texts(["a box"]), FakeEmbedder().embed_texts(["a box"]))
    with pytest.raises(UserError, match="empty"):
        cond([" "])
