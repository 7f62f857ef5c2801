"""The text priors (priors/): the bank's exact search and sampling, the calibrated temperature, the statistics,
the learned flow prior, and the one-line errors when a run lacks what a prior needs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cclddg.errors import UserError
from cclddg.priors import (
    EmbeddingBank,
    PriorSettings,
    EmbeddingStats,
    FlowPrior,
    make_text_prior,
)
from cclddg.priors.bank import calibrate_inv_temperature, mean_log_likelihood
from cclddg.priors.pairs import EmbeddingPairs
from cclddg.priors.stats import STATS_FILE, stats_path


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def stats_for(image: torch.Tensor, text: torch.Tensor, captioned=None, bank_size: int = 1000) -> EmbeddingStats:
    return EmbeddingStats.measure(EmbeddingPairs(image, text, captioned), "test", bank_size=bank_size)


# ---- the bank --------------------------------------------------------------------------------------------
def test_chunked_topk_is_the_exact_topk():
    rows, queries = unit(1000, 16, seed=1), unit(30, 16, seed=2)
    bank = EmbeddingBank(rows, chunk=97)  # chunks that do not divide the bank
    values, indices = bank.topk(queries, 7)
    want_v, want_i = (queries @ rows.T).topk(7)
    torch.testing.assert_close(values, want_v)
    assert torch.equal(indices, want_i)
    assert bank.topk(queries, 5000)[1].shape == (30, 1000)  # k is capped at the bank's size


def test_chunked_sampling_follows_the_softmax_over_the_whole_bank():
    rows = unit(50, 8, seed=3)
    query = unit(1, 8, seed=4)
    beta = 6.0
    want = torch.softmax(beta * (query @ rows.T)[0].double(), dim=0)
    for chunk in (7, 50, 1000):  # the draws follow the same law however the bank is cut
        bank = EmbeddingBank(rows, chunk=chunk)
        drawn = bank.sample(query.repeat(20000, 1), beta, torch.Generator().manual_seed(0))
        freq = torch.bincount(drawn, minlength=50).double() / 20000
        assert 0.5 * (freq - want).abs().sum().item() < 0.03  # total variation, sampling noise ~0.02
    again = EmbeddingBank(rows, chunk=7).sample(query.repeat(10, 1), beta, torch.Generator().manual_seed(1))
    assert torch.equal(again, EmbeddingBank(rows, chunk=7).sample(query.repeat(10, 1), beta,
                                                                  torch.Generator().manual_seed(1)))
    mean = EmbeddingBank(rows, chunk=7).softmax_mean(query, beta)
    torch.testing.assert_close(mean[0], (want.float()[:, None] * rows).sum(0), atol=1e-5, rtol=1e-4)


def test_calibration_recovers_the_temperature_the_pairs_were_drawn_with():
    """Queries whose own row is drawn from softmax(beta x cosine): the calibrated beta is that beta, and it
    maximises the mean log-likelihood."""
    rows = unit(400, 12, seed=5)
    queries = unit(3000, 12, seed=6)
    bank = EmbeddingBank(rows)
    true_beta = 9.0
    targets = bank.sample(queries, true_beta, torch.Generator().manual_seed(2))
    beta = calibrate_inv_temperature(bank, queries, targets)
    assert beta == pytest.approx(true_beta, rel=0.1)
    best = mean_log_likelihood(bank, queries, targets, beta)
    assert best > mean_log_likelihood(bank, queries, targets, beta * 1.5)
    assert best > mean_log_likelihood(bank, queries, targets, beta / 1.5)


# ---- the statistics --------------------------------------------------------------------------------------
def test_stats_keep_captioned_text_only_a_bounded_bank_and_the_temperature(tmp_path):
    image, text = unit(50, 8, seed=7), unit(50, 8, seed=8)
    captioned = torch.arange(50) < 10
    stats = stats_for(image, text, captioned, bank_size=20)
    torch.testing.assert_close(stats.text_mean, text[:10].mean(0))
    torch.testing.assert_close(stats.image_mean, image.mean(0))
    assert stats.bank.shape == (20, 8) and stats.bank.dtype == torch.float16
    assert stats.inv_temperature is not None and stats.inv_temperature > 0
    path = tmp_path / STATS_FILE
    stats.save(path)
    back = EmbeddingStats.load(path)
    assert back.source == "test" and torch.equal(back.bank, stats.bank)
    assert back.inv_temperature == stats.inv_temperature
    torch.testing.assert_close(back.gap, stats.gap)
    assert stats_path(tmp_path / "checkpoints" / "step_0000010") == path
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(UserError, match="damaged.*embedding-stats"):
        EmbeddingStats.load(path)
    uncaptioned = stats_for(image, text, torch.zeros(50, dtype=torch.bool))
    assert uncaptioned.text_mean is None and uncaptioned.inv_temperature is None and len(uncaptioned.bank) == 50
    uncaptioned.save(path)
    loaded = EmbeddingStats.load(path)
    with pytest.raises(UserError, match="without captions.*--data SOURCE"):
        make_text_prior(PriorSettings("gap"), loaded)
    with pytest.raises(UserError, match="calibrated temperature.*embedding-stats"):
        make_text_prior(PriorSettings("posterior"), loaded)
    assert make_text_prior(PriorSettings("retrieval", k=1), loaded)(text).shape == text.shape  # needs no captions


# ---- the priors --------------------------------------------------------------------------------------------
def test_gap_prior_moves_text_by_the_mean_difference():
    # image and text embeddings of the same content sit on two shifted cones (the modality gap)
    content = unit(500, 64, seed=3)
    offset = unit(1, 64, seed=4) * 0.8
    image, text = F.normalize(content + offset, dim=-1), F.normalize(content - offset, dim=-1)
    stats = stats_for(image, text)
    moved = make_text_prior(PriorSettings("gap"), stats)(text)
    torch.testing.assert_close(moved.norm(dim=-1), torch.ones(500))
    before = (text * image).sum(-1).mean().item()
    after = (moved * image).sum(-1).mean().item()
    assert after > before + 0.2 and after > 0.9  # the matched image is now much nearer
    torch.testing.assert_close(stats.gap, image.mean(0) - text.mean(0))
    assert torch.equal(make_text_prior(PriorSettings("none"))(text), text)


def test_retrieval_prior_returns_bank_rows_among_the_nearest():
    bank = unit(300, 16, seed=5)
    stats = EmbeddingStats(bank.mean(0), bank.mean(0), bank.half(), "test")
    queries = unit(20, 16, seed=6)
    picked = make_text_prior(PriorSettings("retrieval", k=1), stats)(queries)
    nearest = (queries @ stats.bank.float().T).argmax(-1)
    torch.testing.assert_close(picked, stats.bank.float()[nearest])
    prior = make_text_prior(PriorSettings("retrieval", k=5), stats)
    drawn = prior(queries.repeat(50, 1), torch.Generator().manual_seed(0))
    top5 = (queries @ stats.bank.float().T).topk(5).indices
    for row, query_index in zip(drawn, list(range(20)) * 50):
        match = (stats.bank.float() == row).all(-1).nonzero().flatten().tolist()
        assert match and match[0] in top5[query_index].tolist()
    assert len({tuple(r.tolist()) for r in drawn[::20]}) > 1  # repeats of a prompt draw different neighbours
    assert torch.equal(drawn, prior(queries.repeat(50, 1), torch.Generator().manual_seed(0)))
    torch.testing.assert_close(prior.mean(queries), F.normalize(stats.bank.float()[top5].mean(1), dim=-1))


def test_posterior_prior_spreads_over_every_row_that_fits_where_topk_picks_a_few():
    """Four clusters of 100 near-copies; a query on cluster 0 whose similarities also vary a little inside the
    cluster. The calibrated posterior draws from all of cluster 0; top-8 only from its 8 nearest."""
    centres = unit(4, 32, seed=10)
    members = F.normalize(centres.repeat_interleave(100, dim=0) + 0.05 * unit(400, 32, seed=11), dim=-1)
    stats = EmbeddingStats(members.mean(0), members.mean(0), members.half(), "test", inv_temperature=40.0)
    query = centres[:1].repeat(4000, 1)
    drawn = make_text_prior(PriorSettings("posterior"), stats)(query, torch.Generator().manual_seed(0))
    rows = [int((stats.bank.float() == r).all(-1).nonzero()[0]) for r in drawn[:2000]]
    assert sum(r < 100 for r in rows) / len(rows) > 0.99  # the right cluster
    assert len(set(rows)) > 80  # most of its members
    top = make_text_prior(PriorSettings("retrieval", k=8), stats)(query, torch.Generator().manual_seed(0))
    assert len({tuple(r.tolist()) for r in top}) == 8


def test_flow_prior_learns_a_conditional_distribution_with_the_datas_variety():
    """Two conditions; condition A's images are one of two clusters (half each), B's a third. Trained on those
    pairs, samples for A land on both of A's clusters in about equal parts, and never on B's."""
    torch.manual_seed(0)
    dim = 8
    clusters = unit(3, dim, seed=12) * 3
    cond_a, cond_b = unit(1, dim, seed=13), unit(1, dim, seed=14)
    n = 4000
    which = torch.randint(0, 3, (n,))
    image = F.normalize(clusters[which] + 0.05 * torch.randn(n, dim), dim=-1)
    text = torch.where((which < 2)[:, None], cond_a, cond_b)
    prior = FlowPrior(dim=dim, width=64, depth=2)
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    for _ in range(600):
        idx = torch.randint(0, n, (256,))
        loss = prior.loss(image[idx], text[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    sampled = make_text_prior(PriorSettings("flow"), flow=prior.eval(), dim=dim)
    samples = sampled(cond_a.repeat(400, 1), torch.Generator().manual_seed(0))
    nearest = (samples @ F.normalize(clusters, dim=-1).T).argmax(-1)
    counts = torch.bincount(nearest, minlength=3)
    assert counts[2] < 8  # not B's
    assert 0.35 < counts[0] / 400 < 0.65  # both of A's, about half each
    with pytest.raises(UserError, match="16-d.*8-d.*train-prior"):
        make_text_prior(PriorSettings("flow"), flow=FlowPrior(dim=16, width=16, depth=1), dim=8)


def test_the_prior_trains_in_bf16_as_well_as_in_fp32(tmp_path):
    """`train-prior --mixed_precision bf16` (the demo's, on a CPU with native bf16): the trainer's own loop on
    clustered pairs reaches a held-out loss within 10% of fp32's, far below the untrained one; weights stay fp32."""
    from cclddg.config import PriorTrainConfig
    from cclddg.training.prior_trainer import PriorTrainer

    torch.manual_seed(0)
    dim, n = 8, 2000
    clusters, conds = unit(4, dim, seed=12) * 3, unit(4, dim, seed=13)
    which = torch.randint(0, 4, (n,))
    pairs = EmbeddingPairs(F.normalize(clusters[which] + 0.05 * torch.randn(n, dim), dim=-1), conds[which])
    losses = {}
    for mode in ("no", "bf16"):
        cfg = PriorTrainConfig(width=64, depth=2, batch_size=128, lr=3e-3, n_batches=300, eval_size=200,
                               mixed_precision=mode, log_every=100)
        trainer = PriorTrainer(cfg, tmp_path / mode, pairs, progress=False)
        untrained = trainer.held_out_loss()
        losses[mode] = trainer.run()["held_out_loss"]
        assert losses[mode] < 0.5 * untrained
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert abs(losses["bf16"] - losses["no"]) < 0.1 * losses["no"]
    with pytest.raises(UserError, match="--mixed_precision 'fp16' is not valid for the prior"):
        PriorTrainConfig(mixed_precision="fp16").validate()


def test_a_prior_that_lacks_what_it_needs_says_the_command_that_adds_it():
    with pytest.raises(UserError, match="cclddg embedding-stats runs/old"):
        make_text_prior(PriorSettings("gap"), None, where="runs/old")
    with pytest.raises(UserError, match="cclddg train-prior runs/old"):
        make_text_prior(PriorSettings("flow"), None, None, where="runs/old")
    wrong = EmbeddingStats(torch.zeros(4), torch.zeros(4), torch.zeros(3, 4).half())
    with pytest.raises(UserError, match="4-d.*8-d"):
        make_text_prior(PriorSettings("retrieval"), wrong, dim=8)
    with pytest.raises(UserError, match="--text_prior 'knn' is not valid"):
        make_text_prior(PriorSettings("knn"))
    with pytest.raises(UserError, match="--prior_guidance must be"):
        make_text_prior(PriorSettings("none", guidance=math.inf))
    with pytest.raises(UserError, match="--prior_guidance_start must be"):
        make_text_prior(PriorSettings("none", guidance_start=1.0))


def test_prior_settings_come_from_a_config_with_overrides_on_top():
    class OldConfig:  # a config from before the learned prior: it lacks its settings
        text_prior, prior_k = "retrieval", 5

    assert PriorSettings.of(OldConfig()) == PriorSettings("retrieval", 5, 1.0, 0.0)
    assert PriorSettings.of(OldConfig(), text_prior="flow", prior_k=None, prior_guidance=3.0) == \
        PriorSettings("flow", 5, 3.0, 0.0)


def test_pairs_from_memory_and_their_means():
    image, text = torch.randn(30, 4), torch.randn(30, 4)
    pairs = EmbeddingPairs(image, text, torch.arange(30) % 3 == 0)
    got_image, got_text = pairs.get(np.array([4, 1]))
    torch.testing.assert_close(got_image, F.normalize(image[[4, 1]], dim=-1))
    torch.testing.assert_close(got_text, F.normalize(text[[4, 1]], dim=-1))
    image_mean, text_mean = pairs.means()
    torch.testing.assert_close(image_mean, image.mean(0))
    torch.testing.assert_close(text_mean, text[::3].mean(0))
    with pytest.raises(ValueError, match="one shape"):
        EmbeddingPairs(image, text[:, :2])


def test_a_large_banks_approximate_index_finds_the_exact_neighbours(tmp_path, monkeypatch):
    pytest.importorskip("faiss")
    from cclddg.priors import ann, stats as stats_module

    centres = unit(50, 32, seed=20)
    rows = F.normalize(centres.repeat_interleave(100, dim=0) + 0.3 * unit(5000, 32, seed=21), dim=-1)
    queries = F.normalize(centres[torch.arange(40) % 50] + 0.3 * unit(40, 32, seed=22), dim=-1)
    index = ann.AnnIndex.build(rows.half())
    exact = EmbeddingBank(rows.half()).topk(queries, 8)[1]
    found = index.topk(queries, 8)
    recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / 8 for a, b in zip(found, exact)])
    assert recall > 0.9
    monkeypatch.setattr(stats_module, "ANN_MIN_ROWS", 1000)  # a bank this size gets an index
    measured = stats_for(rows, rows, bank_size=5000)
    assert measured.index is not None
    path = tmp_path / STATS_FILE
    measured.save(path)
    assert (tmp_path / ann.INDEX_FILE).is_file()
    back = EmbeddingStats.load(path)
    prior = make_text_prior(PriorSettings("retrieval", k=8), back)
    assert prior.describe() == "retrieval (k 8, approximate index)"
    assert torch.equal(prior.nearest(queries), found)
    (tmp_path / ann.INDEX_FILE).write_bytes(b"not an index")
    with pytest.raises(UserError, match="damaged.*embedding-stats"):
        EmbeddingStats.load(path)
