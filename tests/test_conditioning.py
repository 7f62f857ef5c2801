"""The conditioning module: pseudo-text, dropout, the text/image mix, the text priors and their statistics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cclddg import conditioning
from cclddg.conditioning import EmbeddingStats, PromptConditioner, apply_text_prior
from cclddg.errors import UserError


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("xi", [0.25, 0.75, 1.5])
def test_pseudo_text_is_a_unit_vector_at_the_angle_xi_sets(xi):
    c = unit(4000, 256)
    torch.manual_seed(1)  # not unit()'s seed: the noise must not be c itself
    out = conditioning.pseudo_text(c, xi)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(4000))
    # |e/|e|| = 1 and e is nearly orthogonal to c in 256-d: cos(c, c') ~ 1 / sqrt(1 + xi^2)
    assert (c * out).sum(-1).mean().item() == pytest.approx(1 / math.sqrt(1 + xi ** 2), abs=0.01)
    assert torch.equal(conditioning.pseudo_text(c, 0.0), c)


def test_training_condition_mixes_text_and_pseudo_text_and_drop_nulls_rows():
    image, text = unit(2000, 32, seed=1), unit(2000, 32, seed=2)
    torch.manual_seed(0)
    only_images = conditioning.training_condition(image, text, pct_text=0.0, xi=0.0)
    assert torch.equal(only_images, image)
    assert torch.equal(conditioning.training_condition(image, text, pct_text=1.0, xi=0.5), text)
    mixed = conditioning.training_condition(image, text, pct_text=0.3, xi=0.0)
    from_text = (mixed == text).all(-1).float().mean().item()
    assert from_text == pytest.approx(0.3, abs=0.04)
    # fixed grids draw nothing from the RNG
    state = torch.get_rng_state()
    assert torch.equal(conditioning.training_condition(image, text, 0.5, 1.0, random=False), image)
    assert torch.equal(torch.get_rng_state(), state)
    dropped = conditioning.drop(image, 0.25)
    null = (dropped == 0).all(-1)
    assert null.float().mean().item() == pytest.approx(0.25, abs=0.04)
    assert torch.equal(dropped[~null], image[~null])


def stats_for(image: torch.Tensor, text: torch.Tensor, bank_size: int = 1000) -> EmbeddingStats:
    return EmbeddingStats.measure(image, text, "test", bank_size=bank_size)


def test_gap_prior_moves_text_by_the_mean_difference():
    # image and text embeddings of the same content sit on two shifted cones (the modality gap)
    content = unit(500, 64, seed=3)
    offset = unit(1, 64, seed=4) * 0.8
    image, text = F.normalize(content + offset, dim=-1), F.normalize(content - offset, dim=-1)
    stats = stats_for(image, text)
    moved = apply_text_prior(text, "gap", stats)
    torch.testing.assert_close(moved.norm(dim=-1), torch.ones(500))
    before = (text * image).sum(-1).mean().item()
    after = (moved * image).sum(-1).mean().item()
    assert after > before + 0.2 and after > 0.9  # the matched image is now much nearer
    torch.testing.assert_close(stats.gap, image.mean(0) - text.mean(0))
    assert torch.equal(apply_text_prior(text, "none", None), text)


def test_retrieval_prior_returns_bank_rows_among_the_nearest():
    bank = unit(300, 16, seed=5)
    stats = EmbeddingStats(bank.mean(0), bank.mean(0), bank.half(), "test")
    queries = unit(20, 16, seed=6)
    picked = apply_text_prior(queries, "retrieval", stats, k=1)
    nearest = (queries @ stats.bank.float().T).argmax(-1)
    torch.testing.assert_close(picked, stats.bank.float()[nearest])
    drawn = apply_text_prior(queries.repeat(50, 1), "retrieval", stats, k=5, generator=torch.Generator().manual_seed(0))
    top5 = (queries @ stats.bank.float().T).topk(5).indices
    for row, query_index in zip(drawn, list(range(20)) * 50):
        match = (stats.bank.float() == row).all(-1).nonzero().flatten().tolist()
        assert match and match[0] in top5[query_index].tolist()
    assert len({tuple(r.tolist()) for r in drawn[::20]}) > 1  # repeats of a prompt draw different neighbours
    again = apply_text_prior(queries.repeat(50, 1), "retrieval", stats, k=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(drawn, again)
    mean = apply_text_prior(queries, "retrieval", stats, k=5, pick="mean")
    torch.testing.assert_close(mean, F.normalize(stats.bank.float()[top5].mean(1), dim=-1))


def test_stats_keep_captioned_text_only_and_a_bounded_bank(tmp_path):
    image, text = unit(50, 8, seed=7), unit(50, 8, seed=8)
    captioned = torch.arange(50) < 10
    stats = EmbeddingStats.measure(image, text, "src", captioned, bank_size=20)
    torch.testing.assert_close(stats.text_mean, text[:10].mean(0))
    assert stats.bank.shape == (20, 8) and stats.bank.dtype == torch.float16
    path = tmp_path / conditioning.STATS_FILE
    stats.save(path)
    back = EmbeddingStats.load(path)
    assert back.source == "src" and torch.equal(back.bank, stats.bank)
    torch.testing.assert_close(back.gap, stats.gap)
    assert conditioning.stats_path(tmp_path / "checkpoints" / "step_0000010") == path
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(UserError, match="damaged.*embedding-stats"):
        EmbeddingStats.load(path)
    uncaptioned = EmbeddingStats.measure(image, text, "photos/", torch.zeros(50, dtype=torch.bool))
    assert uncaptioned.text_mean is None and len(uncaptioned.bank) == 50  # retrieval still works
    uncaptioned.save(path)
    with pytest.raises(UserError, match="without captions.*--data SOURCE"):
        apply_text_prior(text, "gap", EmbeddingStats.load(path))
    assert apply_text_prior(text, "retrieval", EmbeddingStats.load(path), k=1).shape == text.shape


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


def test_prompt_conditioner_needs_stats_for_a_prior_and_fitting_ones():
    with pytest.raises(UserError, match="cclddg embedding-stats runs/old"):
        PromptConditioner(FakeEmbedder(), "gap", None, run="runs/old")
    wrong = EmbeddingStats(torch.zeros(4), torch.zeros(4), torch.zeros(3, 4).half())
    with pytest.raises(UserError, match="4-d.*8-d"):
        PromptConditioner(FakeEmbedder(), "gap", wrong)
    with pytest.raises(UserError, match="--text_prior 'knn' is not valid"):
        PromptConditioner(FakeEmbedder(), "knn")
    bank = unit(40, 8, seed=9)
    cond = PromptConditioner(FakeEmbedder(), "retrieval", EmbeddingStats(bank.mean(0), bank.mean(0), bank.half()), k=3)
    rows = cond(["a red circle", "a box"], n=4, seed=1)
    assert rows.shape == (8, 8)
    assert torch.equal(rows, cond(["a red circle", "a box"], n=4, seed=1))
    images = torch.rand(1, 3, 4, 4) * 2 - 1
    mixed = cond(["a red circle"], images, image_weight=1.0, n=2)
    torch.testing.assert_close(mixed, FakeEmbedder().embed_images(images).repeat(2, 1))
