"""Mixed precision for the trainer: autocast for the forward passes, and for fp16 one loss scaler per optimizer.

The weights, the optimizers' state and the EMA stay in fp32; only activations run in the lower precision. fp16
needs loss scaling (its gradients underflow); bf16 has fp32's range and needs none. D and G each have their own
scaler because their gradients differ by orders of magnitude. R1 takes its input gradient of the scaled output
(`objectives.ddgan.discriminator_loss(grad_scale=...)`), so the penalty is correct at any scale.
"""

from __future__ import annotations

import contextlib

import torch

from cclddg.config import PRECISIONS
from cclddg.errors import UserError

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def check_precision(mode: str, device: torch.device) -> None:
    """Refuse a precision this device cannot run, before any model is built."""
    if mode not in PRECISIONS:
        raise UserError(f"--mixed_precision {mode!r} is not valid; choose one of {', '.join(PRECISIONS)}")
    if mode == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--mixed_precision bf16: this GPU ({torch.cuda.get_device_name(device)}) has no bf16; "
                        "use --mixed_precision fp16")


def autocast(mode: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward passes' precision context (a no-op for "no")."""
    if mode == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[mode])


def grad_scaler(mode: str, device: torch.device) -> torch.amp.GradScaler:
    """A loss scaler, enabled for fp16 only (a disabled one passes losses and steps through unchanged)."""
    return torch.amp.GradScaler(device.type, enabled=mode == "fp16")
