"""A scheduler's request to stop (SIGTERM; SIGUSR1, which SLURM's `--signal` can send ahead of the time limit),
handled like Ctrl-C but at the end of a training step, so nothing is lost.

`handle_stop_signals()` (the CLI, once per command) turns the signals into `Preempted`, a KeyboardInterrupt: every
place that keeps its work on Ctrl-C (a checkpoint, finished cache shards, written samples) keeps it on a
scheduler's signal too. Inside `deferred()` (the training loop, a checkpoint write) the signal is only recorded:
the loop finishes its step, writes a checkpoint and then raises (`pending()` says whether one arrived).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_PREEMPTED = 143  # a stop signal (128 + SIGTERM, what a shell reports for a process SIGTERM ended)


class Preempted(KeyboardInterrupt):
    """The process was asked to stop by a signal (not by the user's Ctrl-C)."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signal.Signals(signum).name)
        self.signal_name = signal.Signals(signum).name


_deferring = 0  # depth of nested deferred() blocks
_pending: int | None = None  # a signal that arrived while deferring


def _on_signal(signum: int, frame) -> None:
    global _pending
    if _deferring:
        _pending = signum
        return
    raise Preempted(signum)


def handle_stop_signals() -> None:
    """SIGTERM and SIGUSR1 raise `Preempted` (or are recorded inside `deferred()`); only the main thread can."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, _on_signal)


def pending() -> int | None:
    """The stop signal that arrived inside `deferred()`, if one did."""
    return _pending


@contextmanager
def deferred() -> Iterator[None]:
    """Record a stop signal instead of raising it; leaving the outermost block raises it if one came and no
    other exception is on its way."""
    global _deferring, _pending
    _deferring += 1
    try:
        yield
    except BaseException:
        _deferring -= 1
        if not _deferring:
            _pending = None  # the exception on its way ends the command anyway
        raise
    _deferring -= 1
    if not _deferring and _pending is not None:
        signum, _pending = _pending, None
        raise Preempted(signum)


def consume() -> Preempted:
    """The recorded signal as the exception to raise now (the caller checked `pending()` or its ranks agreed)."""
    global _pending
    signum, _pending = (_pending or signal.SIGTERM), None
    return Preempted(signum)


def how_stopped(exc: KeyboardInterrupt) -> tuple[str, int]:
    """The words for an interruption and the exit code: Ctrl-C ("interrupted", 130) or a signal ("stopped by
    SIGTERM", 143)."""
    if isinstance(exc, Preempted):
        return f"stopped by {exc.signal_name}", EXIT_PREEMPTED
    return "interrupted", EXIT_INTERRUPTED
