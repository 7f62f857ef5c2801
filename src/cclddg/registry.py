"""A registry of parts by name (the objectives, the conditioning kinds): each name maps to the module that defines
its part, imported when the part is first asked for, so the names are known without importing anything heavy (the
command line offers them before torch loads); code outside the package may `register` an instance."""

from __future__ import annotations

import importlib
from typing import Generic, TypeVar

from cclddg.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, flag: str, attribute: str, modules: dict[str, str]):
        """`flag`: the option that names a part (for the unknown-name message); `attribute`: the module-level name
        of the part in its module; `modules`: name -> module."""
        self.flag, self.attribute = flag, attribute
        self._entries: dict[str, str | T] = dict(modules)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def get(self, name: str) -> T:
        """The part called `name`; an unknown name is one line naming the known ones."""
        entry = self._entries.get(name)
        if entry is None:
            raise UserError(f"{self.flag} {name!r} is not valid; choose one of {', '.join(self._entries)}")
        if isinstance(entry, str):
            entry = self._entries[name] = getattr(importlib.import_module(entry), self.attribute)
        return entry

    def register(self, part: T) -> None:
        """Make `part` available under its `name` (a plug-in's, or a test's own)."""
        self._entries[part.name] = part

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)
