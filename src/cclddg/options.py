"""Numeric options: one check (a number of the right kind, finite, in range) for every command.

A config dataclass declares the range of each numeric field in `RANGES`; the command line parses a flag with
`parse_number(kind, rng)`, so `--lr_gen nan` or `--cfg -1` stops before anything is built, in one line. A
config.json read back on --resume goes through the same check (`check_fields`), so a hand-edited file with a
string where a number goes is one line too.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

from cclddg.errors import UserError


@dataclass(frozen=True)
class Range:
    """The values a numeric option may take; `None` bounds are open-ended."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: `low` itself is refused
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def describe(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_fmt(self.low)}" if self.low is not None else "finite"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {_fmt(self.high)}"
        return f"in {'(' if self.low_open else '['}{_fmt(self.low)}, {_fmt(self.high)}{')' if self.high_open else ']'}"


def _fmt(x: float | None) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


ANY = Range()
POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_1 = Range(1)
FRACTION = Range(0, 1)  # [0, 1]
BELOW_1 = Range(0, 1, high_open=True)  # [0, 1)
SEEDS = Range(0, 2**32 - 1)  # numpy's seeds are 32-bit
THREADS = Range(0, 1024)  # 0: torch's own choice
GUIDANCE = Range(0, 100)  # classifier-free guidance scales: 0 unconditional, 1 plain, beyond ~10 saturated


def number_problem(value: Any, rng: Range, integer: bool = False) -> str | None:
    """What is wrong with `value` as a finite number (an integer when `integer`) in `rng`, e.g. "must be >= 1,
    got 0"; None when nothing is."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        return f"must be {'an integer' if integer else 'a number'}, got {value!r}"
    if not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if not rng.contains(value):
        return f"must be {rng.describe()}, got {value if integer else format(value, 'g')}"
    return None


def check_number(name: str, value: Any, rng: Range, integer: bool = False) -> Any:
    """`value` if it is a finite number (an integer when `integer`) in `rng`; else one line naming --name."""
    problem = number_problem(value, rng, integer)
    if problem:
        raise UserError(f"--{name} {problem}")
    return value


def parse_number(kind: type, rng: Range = ANY) -> Callable[[str], Any]:
    """An argparse type: text -> int or float, finite and in `rng` (argparse prints the message in one line)."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        problem = number_problem(value, rng, integer=kind is int)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def field_kind(annotation: str) -> tuple[str, bool]:
    """('int' | 'float' | 'bool' | 'str' | 'tuple-int' | 'tuple-float' | 'tuple-bool' | 'other', optional) from a
    dataclass annotation written as a string (`from __future__ import annotations`)."""
    text = annotation.replace(" ", "")
    optional = text.endswith("|None")
    text = text.removesuffix("|None")
    if text.startswith("tuple["):
        inner = text[len("tuple["):].split(",")[0].rstrip("]")
        return f"tuple-{inner}", optional
    return (text if text in ("int", "float", "bool", "str") else "other"), optional


def check_fields(cfg: Any) -> None:
    """Every field of a config dataclass has the type its annotation names; numeric ones are in their range
    (`cfg.RANGES`, which must name every numeric field)."""
    ranges: dict[str, Range] = getattr(cfg, "RANGES", {})
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        kind, optional = field_kind(str(f.type))
        if value is None and optional:
            continue
        if kind == "str":
            if not isinstance(value, str):
                raise UserError(f"--{f.name} must be text, got {value!r}")
        elif kind == "bool":
            if not isinstance(value, bool):
                raise UserError(f"--{f.name} must be true or false, got {value!r}")
        elif kind in ("int", "float"):
            check_number(f.name, value, ranges[f.name], integer=kind == "int")
        elif kind.startswith("tuple-"):
            inner = kind[len("tuple-"):]
            if not isinstance(value, (tuple, list)) or not value:
                raise UserError(f"--{f.name} must be a list of {inner} values, got {value!r}")
            for item in value:
                if inner == "bool":
                    if not isinstance(item, bool):
                        raise UserError(f"--{f.name} must be a list of true/false flags, got {value!r}")
                else:
                    check_number(f.name, item, ranges[f.name], integer=inner == "int")
