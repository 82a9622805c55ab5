"""Compiled programs kept for the session, so that a kernel of the same model and shapes
compiles once however many ``ntk_fn`` s ask for it."""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ntk import _kernel_cache
from ntk.models import FingerprintError, ModelInfo

__all__ = ["compiled", "program_fn_key"]

# {key: (f, executable)}, least recently used first.
_PROGRAMS: collections.OrderedDict[tuple, tuple[Callable, Any]] = collections.OrderedDict()
MAX_PROGRAMS = 32


def program_fn_key(f: Callable, info: ModelInfo) -> tuple:
    """A key for ``f`` across ``ntk_fn`` s: its content fingerprint, else ``f`` itself (equal
    only to itself, unless its type defines equality by content)."""
    try:
        return ("content", _kernel_cache.function_key(f, info))
    except FingerprintError:
        return ("object", f)


def _spec(a: Any) -> tuple:
    sharding = getattr(a, "sharding", None)  # programs on a mesh differ from one device's
    placed = () if sharding is None or len(sharding.device_set) == 1 else (str(sharding),)
    return np.shape(a), str(getattr(a, "dtype", None) or np.result_type(a)), *placed


def compiled(f: Callable, fn_key: tuple, what: tuple, lower: Callable[[], Any], args) -> Any:
    """The executable ``lower().compile()`` for (``fn_key``, ``what``, the shapes and dtypes of
    ``args``), compiled on first use and kept (the 32 most recently used)."""
    key = (fn_key, what, str(jax.tree.structure(args)), str(jax.tree.map(_spec, args)))
    hit = _PROGRAMS.get(key)
    if hit is not None:
        _PROGRAMS.move_to_end(key)
        return hit[1]
    _PROGRAMS[key] = (f, lower().compile())
    while len(_PROGRAMS) > MAX_PROGRAMS:
        _PROGRAMS.popitem(last=False)
    return _PROGRAMS[key][1]
