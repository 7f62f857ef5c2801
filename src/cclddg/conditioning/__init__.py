"""The conditioning kinds by name (`cfg.cond`): each one a module whose `KIND` is a `ConditionKind`
(conditioning/base.py) that owns the vector `c` its runs are conditioned on.

    labels      conditioning/labels.py          the shapes label vector, asked with attribute requests
    embedding   conditioning/embedding.py       an embedder's vectors, asked with text and image prompts
                conditioning/prompts.py         (prompts -> conditions, through the run's text prior)
    none        conditioning/unconditional.py   nothing

A module is imported when its kind is first asked for, so that the names are known without torch (the command
line offers them before anything heavy loads). Adding one: a module with its `KIND`, and its line in `KINDS`
(docs/ARCHITECTURE.md has a worked example); code outside the package may `register` an
instance (registry.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cclddg.registry import Registry

if TYPE_CHECKING:
    from cclddg.conditioning.base import ConditionKind

KINDS: "Registry[ConditionKind]" = Registry("--cond", "KIND", {
    "labels": "cclddg.conditioning.labels",
    "embedding": "cclddg.conditioning.embedding",
    "none": "cclddg.conditioning.unconditional",
})
names, get, register = KINDS.names, KINDS.get, KINDS.register
