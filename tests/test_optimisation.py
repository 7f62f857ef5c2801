"""The generator run's optimizers: the fused kernel where torch has one, with torch's reference updates."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cclddg.config import TrainConfig
from cclddg.training.optimisation import make_optimizer


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_the_optimizer_is_fused_on_the_cpu_and_updates_as_torchs_per_tensor_loop(kind):
    cfg = dataclasses.replace(TrainConfig(), optimizer=kind, adam_betas=(0.5, 0.9), weight_decay=0.01)
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(3))]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    start = ours[0].detach().clone()
    opt = make_optimizer(cfg, ours, lr=1e-2)
    assert opt.param_groups[0]["fused"], "the CPU step spent a third of its time in the per-tensor loop"
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    ref = cls(reference, lr=1e-2, betas=(0.5, 0.9), weight_decay=0.01, foreach=False)
    for _ in range(5):
        for params, o in ((ours, opt), (reference, ref)):
            o.zero_grad()
            (params[0].sum(1).pow(2).sum() + params[1].exp().sum()).backward()
            o.step()
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert (ours[0] - start).abs().min() > 1e-3  # every weight moved
