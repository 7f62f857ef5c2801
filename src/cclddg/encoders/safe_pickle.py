"""Load a pickle that may only hold numpy arrays and plain containers.

A pickle is a program: `pickle.load` will call whatever global the file names (os.system included).
The CLOOB checkpoints are pickles downloaded from the internet, so they are read with an unpickler
whose `find_class` hands out only the handful of callables that rebuild numpy arrays, dtypes,
numpy scalars and ordered dicts; any other global stops the load before it is called.
"""

from __future__ import annotations

import collections
import importlib
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from cclddg.errors import UserError


def _numpy_core(submodule: str, name: str) -> Callable[[], Any]:
    """Resolve `numpy._core.<submodule>.<name>` (numpy 2) or `numpy.core...` (numpy 1) on first use."""
    def get() -> Any:
        for package in ("numpy._core", "numpy.core"):
            try:
                return getattr(importlib.import_module(f"{package}.{submodule}"), name)
            except (ImportError, AttributeError):
                continue
        raise UserError(f"this numpy has no {submodule}.{name}; cannot rebuild the arrays of the pickle")
    return get


def _fixed(obj: Any) -> Callable[[], Any]:
    return lambda: obj


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for `_codecs.encode`, which protocols 0-2 use to write `bytes`; latin-1 only."""
    if not isinstance(text, str) or encoding.replace("-", "").replace("_", "").lower() != "latin1":
        raise pickle.UnpicklingError(f"unexpected _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


# (module, name) as written in the pickle -> the object to hand out. Pickles from numpy 1 name
# `numpy.core.*`, pickles from numpy 2 name `numpy._core.*`: both map to whatever this numpy has,
# so no module named by the file is ever imported.
_ALLOWED: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy", "ndarray"): _fixed(np.ndarray),
    ("numpy", "dtype"): _fixed(np.dtype),
    ("collections", "OrderedDict"): _fixed(collections.OrderedDict),
    ("builtins", "set"): _fixed(set),
    ("builtins", "frozenset"): _fixed(frozenset),
    ("builtins", "complex"): _fixed(complex),
    ("builtins", "bytearray"): _fixed(bytearray),
    ("_codecs", "encode"): _fixed(_latin1_bytes),
}
for _package in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_package}.multiarray", "_reconstruct")] = _numpy_core("multiarray", "_reconstruct")
    _ALLOWED[(f"{_package}.multiarray", "scalar")] = _numpy_core("multiarray", "scalar")
    _ALLOWED[(f"{_package}.numeric", "_frombuffer")] = _numpy_core("numeric", "_frombuffer")


class ArraysOnlyUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global outside `_ALLOWED`, before anything is called."""

    def __init__(self, file: IO[bytes], source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if module == "__builtin__":  # protocols 0-2 keep Python 2's name for builtins
            module = "builtins"
        getter = _ALLOWED.get((module, name))
        if getter is None:
            raise UserError(f"refusing to load {self.source}: the pickle asks for {module}.{name}; "
                            "a CLOOB checkpoint holds only arrays")
        return getter()

    def persistent_load(self, pid: Any) -> Any:
        raise UserError(f"refusing to load {self.source}: the pickle refers to outside objects (persistent ids); "
                        "a CLOOB checkpoint holds only arrays")


def load_pickle_arrays(path: str | Path) -> Any:
    """Unpickle `path`, allowing only numpy arrays and plain containers; every failure is a UserError."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return ArraysOnlyUnpickler(f, str(path)).load()
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; give the path of a downloaded CLOOB checkpoint (.pkl)") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder; give the path of a CLOOB checkpoint file (.pkl)") from None
    except PermissionError:
        raise UserError(f"{path} cannot be read (permission denied)") from None
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OverflowError, MemoryError, UnicodeDecodeError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"{path} is not a readable pickle (truncated or damaged?): {reason}") from None
