"""Exponential moving average of the generator's weights; samples come from the EMA copy."""

from __future__ import annotations

import torch


def warmup_decay(decay: float, step: int) -> float:
    """min(decay, (1+step)/(10+step)): early on the EMA follows the weights closely, so that short runs
    (a few thousand steps, as on a CPU) are not averaged over their random start."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay·ema + (1-decay)·model for parameters; buffers are copied. decay 0 makes a plain copy."""
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    if decay == 0.0:
        torch._foreach_copy_(ema_params, params)
    else:
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)
