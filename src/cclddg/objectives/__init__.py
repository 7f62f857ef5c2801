"""The training objectives by name (`cfg.objective`): each one a module whose `OBJECTIVE` is an `Objective`
(objectives/base.py) that builds its nets, takes its training step and says how its model samples.

    ddgan       objectives/ddgan.py       generator + discriminator, T large steps (the default)
    diffusion   objectives/diffusion.py   the DDPM baseline: ε-prediction, sampled by DDPM or DDIM

A module is imported when its objective is first asked for, so that the names are known without torch (the
command line offers them before anything heavy loads). Adding one: a module with its `OBJECTIVE`, and its line in
`OBJECTIVES` (docs/ARCHITECTURE.md has a worked example); code outside the package may `register` an
instance (registry.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cclddg.registry import Registry

if TYPE_CHECKING:
    from cclddg.objectives.base import Objective

OBJECTIVES: "Registry[Objective]" = Registry("--objective", "OBJECTIVE", {
    "ddgan": "cclddg.objectives.ddgan",
    "diffusion": "cclddg.objectives.diffusion",
})
names, get, register = OBJECTIVES.names, OBJECTIVES.get, OBJECTIVES.register
